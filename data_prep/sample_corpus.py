"""Build the embedded sample corpus: what `make data` runs, with no download.

    python -m data_prep.sample_corpus --out data/sample

The corpus is the Python standard library's own source (every machine with Python has it): the
`.py` files under sysconfig's stdlib path, sorted, capped at --max-bytes. Writes
  OUT/tokenizer.model, OUT/tokenizer.card.json   sentencepiece BPE, vocab 8192 (the tiny preset)
  OUT/shards/                                     train/validation shards + manifest.json
Re-running reuses whatever exists and verifies (and resumes a killed run); it never replaces
existing outputs unless --overwrite is given.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path
from typing import Sequence

from data_prep.cli import command_parser, interrupt_exits
from data_prep.output_dir import OutputDirError
from data_prep.sources import Source, SourceError, check_text_file
from data_prep.tokenize import tokenize_source
from data_prep.tokenizer_card import TokenizerError, card_path_for, load_tokenizer
from data_prep.train_tokenizer import train_tokenizer
from retnet_train.data.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_shards

VOCAB_SIZE = 8192
DEFAULT_MAX_BYTES = 16_000_000  # ~5M tokens: tokenizer + shards in well under a minute on 2 cores
SHARD_TOKENS = 1 << 20  # several shards even for the sample, so multi-shard reading is exercised


def stdlib_source_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Sorted stdlib .py files that are valid UTF-8 (a few test fixtures deliberately are not),
    taken in order until max_bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(p for p in stdlib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)):
        try:
            check_text_file(path)
        except SourceError:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise SourceError(f"{stdlib}: no Python source files found under the standard library path")
    return files


def build_sample(
    out: str | Path,
    max_bytes: int = DEFAULT_MAX_BYTES,
    num_proc: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    out = Path(out)
    model_path = out / "tokenizer.model"
    shard_dir = out / "shards"

    def corpus() -> Source:  # scanned only when something has to be built
        files = stdlib_source_files(max_bytes)
        return Source("python_stdlib", f"stdlib:{sysconfig.get_paths()['stdlib']}", files, "text", "document")

    # a .model without its card is a killed earlier run (the card is written second): retrain
    if model_path.exists() and card_path_for(model_path).exists() and not overwrite:
        tok = load_tokenizer(model_path)  # raises if the card does not describe this file
        if tok.vocab_size != VOCAB_SIZE:
            raise TokenizerError(f"{model_path}: vocab_size {tok.vocab_size}, expected {VOCAB_SIZE}; use --overwrite")
        print(f"reusing tokenizer {model_path} (sha256 {tok.sha256[:12]}...)")
    else:
        t0 = time.time()
        source = corpus()
        tok = train_tokenizer([source], model_path, vocab_size=VOCAB_SIZE, num_docs=len(source.files), overwrite=True)
        print(f"trained tokenizer {model_path} on {len(source.files)} files in {time.time() - t0:.1f}s")
        overwrite = True  # shards of an older tokenizer are useless now

    if (shard_dir / MANIFEST_NAME).exists() and not overwrite:
        manifest = read_manifest(shard_dir)
        manifest.check_tokenizer(tok.sha256, tok.vocab_size)
        problems = verify_shards(manifest)
        if problems:
            raise ManifestError(
                "existing sample shards are damaged (run `make clean-data` or pass --overwrite):\n  "
                + "\n  ".join(problems)
            )
        print(f"reusing verified shards {shard_dir} ({manifest.split('train').tokens:,} train tokens)")
        return out
    t0 = time.time()
    manifest = tokenize_source(
        corpus(),
        tok,
        shard_dir,
        validation_fraction=0.02,
        seed=0,
        shard_tokens=SHARD_TOKENS,
        num_proc=num_proc,
        overwrite=overwrite,
        progress=progress,
    )
    counts = ", ".join(f"{k} {v.tokens:,} tokens / {v.documents} docs" for k, v in manifest.splits.items())
    print(f"wrote {manifest.path} in {time.time() - t0:.1f}s: {counts}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = command_parser("sample_corpus", __doc__)
    p.add_argument("--out", default="data/sample", help="directory of the tokenizer and shards/ (default: %(default)s)")
    p.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="bytes of source files taken (default: %(default)s)"
    )
    p.add_argument("--num-proc", type=int, default=None, help="tokenize worker processes (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="build the tokenizer and shards again where they exist")
    a = p.parse_args(argv)
    with interrupt_exits("run the same command again to resume"):
        try:
            out = build_sample(a.out, a.max_bytes, a.num_proc, a.overwrite)
        except (SourceError, TokenizerError, ManifestError, OutputDirError, OSError) as e:  # OSError: names its file
            raise SystemExit(f"error: {e}") from None
    print(
        f"sample data ready in {out} (tokenizer {out / 'tokenizer.model'}, "
        f"card {card_path_for(out / 'tokenizer.model')})"
    )


if __name__ == "__main__":
    main()
