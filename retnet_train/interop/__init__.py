"""Other codebases' RetNet formats: torchscale import (torchscale), fla / Hugging Face export (fla),
and state-dict keys written under older or foreign names (legacy)."""
