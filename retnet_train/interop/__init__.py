"""Other codebases' formats: torchscale RetNet import (torchscale), fla / Hugging Face export (fla),
Hugging Face Llama import into our Transformer (llama), and state-dict keys written under older or
foreign names (legacy)."""
