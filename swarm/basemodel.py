"""Build a tiny, license-clean base model offline: a BPE tokenizer and a short pretraining run.

:func:`make_base` trains a byte-level BPE tokenizer on both corpus domains of :mod:`swarm.corpus`
(so the finetune text is covered), builds a small Llama / Mistral / Qwen2 decoder, pretrains it
on the ``"pretrain"`` domain only and saves a plain Hugging Face checkpoint that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

Results are cached by every argument plus :data:`BASE_CODE_VERSION` and
:data:`swarm.corpus.CORPUS_VERSION`; a cache hit is a directory copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swarm import corpus
from swarm.arch import check_architecture

log = logging.getLogger(__name__)

#: Bump whenever the tokenizer, model or pretraining recipe changes: cached bases are keyed by it.
BASE_CODE_VERSION = "1"
#: File written next to the checkpoint with the build arguments and the final pretraining loss.
META_FILE = "loraswarm_base.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
#: Pre-tokenizer split (the GPT-4 / Qwen2 pattern). ``AutoTokenizer`` loads a ``qwen2`` checkpoint as
#: ``Qwen2Tokenizer``, which rebuilds its pipeline from this pattern + NFC + byte-level, so every base
#: uses that same pipeline and the same ids come out whichever tokenizer class loads it.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRETRAIN_BATCH_SIZE = 16
PRETRAIN_LR = 3e-3
TOKENIZER_DOCS = {"pretrain": 4000, "finetune": 1000}


@dataclass(frozen=True)
class BaseSpec:
    """Every argument that determines the built base model (and hence its cache key)."""

    arch: str = "llama"
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab_size: int = 512
    pretrain_steps: int = 300
    seq_len: int = 64
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        check_architecture(self.arch)
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size must be >= 260 (256 bytes + special tokens), got {self.vocab_size}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")

    def key(self) -> str:
        """Cache key: a hash of the fields, the corpus and code versions and the library versions."""
        import tokenizers
        import transformers

        blob = {
            **asdict(self),
            "corpus": corpus.CORPUS_VERSION,
            "code": BASE_CODE_VERSION,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_root() -> Path:
    """``$LORASWARM_CACHE/bases`` if the variable is set, else ``~/.cache/loraswarm/bases``."""
    env = os.environ.get("LORASWARM_CACHE")
    return Path(env) / "bases" if env else Path.home() / ".cache" / "loraswarm" / "bases"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on ``texts``; a ``PreTrainedTokenizerFast`` with <s>, </s>, <pad>, <unk>.

    No special token is added by encoding: :func:`swarm.data.pack` appends EOS itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_model(spec: BaseSpec, tokenizer: Any) -> Any:
    """A randomly initialised fp32 causal LM of ``spec.arch`` (seeded by ``spec.seed``), SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    check_architecture(spec.arch)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[spec.arch]
    extra: dict[str, Any] = {"sliding_window": None} if spec.arch == "mistral" else {}
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(1024, spec.seq_len),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **extra,
    )
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def pretrain(model: Any, seqs: Any, steps: int, seed: int = 0, progress: bool = True) -> float:
    """Train every parameter of ``model`` for ``steps`` AdamW steps on rows of ``seqs``; return the final loss.

    Warm-up over the first 10% of steps, then cosine decay to 10% of :data:`PRETRAIN_LR`.
    The returned loss is the mean of the last (up to) 10 steps; ``nan`` when ``steps == 0``.
    """
    import torch
    from tqdm.auto import tqdm

    from swarm.data import batches

    if steps == 0:
        return math.nan
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    epoch, it = 0, batches(seqs, PRETRAIN_BATCH_SIZE, seed, 0, drop_last=True)
    bar = tqdm(range(steps), desc="pretraining base", disable=not progress)
    for _ in bar:
        batch = next(it, None)
        if batch is None:
            epoch += 1
            it = batches(seqs, PRETRAIN_BATCH_SIZE, seed, epoch, drop_last=True)
            batch = next(it)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


def _build(spec: BaseSpec, out_dir: Path, progress: bool) -> None:
    """Build the base of ``spec`` into the (existing, empty) directory ``out_dir``."""
    from swarm.data import pack

    t0 = time.perf_counter()
    tok_texts = corpus.generate("pretrain", TOKENIZER_DOCS["pretrain"], spec.seed) + corpus.generate(
        "finetune", TOKENIZER_DOCS["finetune"], spec.seed
    )
    tokenizer = train_tokenizer(tok_texts, spec.vocab_size)
    model = build_model(spec, tokenizer)
    final_loss = math.nan
    if spec.pretrain_steps:
        # About one pass over fresh text (a document is ~30 tokens), at least the tokenizer's sample.
        n_docs = max(TOKENIZER_DOCS["pretrain"], spec.pretrain_steps * PRETRAIN_BATCH_SIZE * spec.seq_len // 30)
        seqs = pack(corpus.generate("pretrain", n_docs, spec.seed), tokenizer, spec.seq_len)
        final_loss = pretrain(model, seqs, spec.pretrain_steps, spec.seed, progress)
        log.info("pretrained base for %d steps: final loss %.4f", spec.pretrain_steps, final_loss)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    meta = {
        "spec": asdict(spec),
        "key": spec.key(),
        "pretrain_final_loss": None if math.isnan(final_loss) else final_loss,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def _copy_into(src: Path, dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"output path {dst} exists and is not a directory")
    shutil.copytree(src, dst, dirs_exist_ok=True)


def make_base(
    out_dir: str | Path,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = 512,
    pretrain_steps: int = 300,
    seq_len: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> Path:
    """Write a tiny pretrained base model + tokenizer to ``out_dir`` and return it.

    ``intermediate`` defaults to ``4 * hidden``. ``pretrain_steps=0`` keeps the random init.
    With ``use_cache`` the result is read from / stored in ``cache_dir/<key>`` (default
    :func:`default_cache_root`); entries are written to a temporary directory and renamed, so an
    interrupted build never leaves a partial entry. Raises ``ValueError`` for bad arguments.
    """
    inter = intermediate if intermediate is not None else 4 * hidden
    spec = BaseSpec(arch, layers, hidden, heads, kv_heads, inter, vocab_size, pretrain_steps, seq_len, seed)
    spec.validate()
    out = Path(out_dir)
    if not use_cache:
        with tempfile.TemporaryDirectory(prefix="loraswarm-base-") as tmp_name:
            _build(spec, Path(tmp_name), progress)
            _copy_into(Path(tmp_name), out)
        return out
    entry = _cache_entry(spec, Path(cache_dir) if cache_dir is not None else default_cache_root(), progress)
    _copy_into(entry, out)
    return out


def _cache_entry(spec: BaseSpec, root: Path, progress: bool) -> Path:
    """The cache directory of ``spec`` under ``root``, built first (temp dir + rename) if missing."""
    entry = root / spec.key()
    if entry.is_dir():
        log.info("base model cache hit: %s", entry)
        return entry
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    try:
        _build(spec, tmp, progress)
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # not a concurrent builder that won the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
