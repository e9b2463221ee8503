"""Export a ``jaxllm train lm`` run directory for use outside this package. Nothing downloads.

``export_run(run, out_dir, fmt="hf")``, or from the shell ``jaxllm export RUN OUT --format hf|safetensors``:

* ``fmt="hf"``: a Hugging Face model directory that ``transformers`` loads with
  ``from_pretrained``: ``config.json`` and ``model.safetensors`` (``GPT2LMHeadModel`` for a GPT-2
  run, ``LlamaForCausalLM`` for a llama-preset decoder; through the config's ``to_hf_config`` and
  ``interop.to_hf``), and always the run's tokenizer as ``tokenizer.json`` +
  ``tokenizer_config.json`` (``AutoTokenizer`` gives the same ids as the run's tiktoken encoding).
  A model without a Hugging Face architecture (the burkov/tiny decoder: per-head Q/K/V,
  interleaved RoPE, ReLU MLP) is refused with ``ValueError``;
* ``fmt="safetensors"``: any run's Flax params, flattened (names are ``/``-joined param paths),
  as ``params.safetensors``, with the run config (model, optimiser, data) as ``run_config.json``.

The export is written into a temporary sibling of ``out_dir`` and renamed into place at the end,
so a failed export leaves nothing half-written. An existing non-empty ``out_dir`` is refused
unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import uuid

import numpy as np
from flax.traverse_util import flatten_dict

from jaxllm.options import option
from jaxllm.options.values import non_negative_int

FORMATS = ("hf", "safetensors")


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "hf", *, step: int | None = None,
               overwrite: bool = False) -> str:
    """Export the run directory ``run`` (its newest intact checkpoint, or ``step``) to ``out_dir``
    in ``fmt`` ("hf" or "safetensors"); returns ``out_dir``. ``ValueError`` names the problem: an
    unknown format, a missing or invalid run, an ``out_dir`` in the way, a model HF cannot hold."""
    from jaxllm.pretrained import _load_run

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    run, out_dir = os.fspath(run), os.path.abspath(os.fspath(out_dir))
    _check_out_dir(run, out_dir, overwrite)  # before the (slower) restore
    config, params, encoding, step, _, run_config = _load_run(run, step)
    if fmt == "hf":
        config, params = config.hf_exportable(params)
        try:  # refuse before anything is written
            hf_config = config.to_hf_config()
        except ValueError as err:
            raise ValueError(f"{run}: its {type(config).__name__} has no Hugging Face architecture to export to "
                             f"({err}); export its raw params with --format safetensors (fmt='safetensors')") from None

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    os.mkdir(tmp)
    try:
        if fmt == "hf":
            _write_hf(tmp, config, params, encoding, hf_config)
        else:
            _write_safetensors(tmp, params, run_config, source=f"{run}@{step}")
        _check_out_dir(run, out_dir, overwrite)  # again: something may have appeared there meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    __doc__ = __doc__
    run: str = option(None, "a `jaxllm train lm` output directory", positional=True, required=True)
    out: str = option(None, "the directory to write (refused when it exists and is not empty, unless --overwrite)",
                      positional=True, required=True)
    format: str = option("hf", "hf: a transformers model directory; safetensors: the raw Flax params and the run "
                               "config", choices=FORMATS)
    step: int | None = option(None, "checkpoint step (default: the newest intact)", type=non_negative_int)
    overwrite: bool = option(False, "replace what OUT holds")


def main(argv=None) -> str:
    """``jaxllm export RUN OUT [--format hf|safetensors] [--step N] [--overwrite]``: ``export_run``."""
    from jaxllm import cli, runio

    args = cli.parse(ExportConfig, argv)
    out = export_run(args.run, args.out, args.format, step=args.step, overwrite=args.overwrite)
    print(f"{args.run} -> {out} ({args.format})")
    if runio.describe_data(args.run):
        print(runio.describe_data(args.run))
    return out


def _check_out_dir(run: str, out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory")
    run_real, out_real = os.path.realpath(run), os.path.realpath(out_dir)
    if os.path.commonpath([run_real, out_real]) == out_real:  # overwrite would delete the run itself
        raise ValueError(f"out_dir {out_dir} is (or contains) the run directory {run}: export elsewhere")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty: choose another directory or pass overwrite=True")


def _sibling(out_dir: str, kind: str) -> str:
    """A fresh hidden name beside ``out_dir`` (same file system, so renames are atomic); not
    ``tempfile.mkdtemp``, whose mode 0700 the renamed export would keep."""
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.{kind}-{uuid.uuid4().hex[:12]}")


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; a previous ``out_dir`` is moved aside first and
    deleted only once the new one is in place."""
    old = _sibling(out_dir, "old") if os.path.isdir(out_dir) else None
    if old is not None:
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- fmt="safetensors"


def _write_safetensors(directory: str, params, run_config: dict, *, source: str) -> None:
    from safetensors.numpy import save_file

    flat = {name: np.ascontiguousarray(value) for name, value in flatten_dict(params, sep="/").items()}
    with open(os.path.join(directory, "run_config.json"), "w") as f:
        json.dump(run_config, f, indent=2)
    save_file(flat, os.path.join(directory, "params.safetensors"), metadata={"format": "flax", "source": source})
    _mode_like(os.path.join(directory, "params.safetensors"), os.path.join(directory, "run_config.json"))


def _mode_like(path: str, reference: str) -> None:
    """Give ``path`` the permissions of ``reference``: safetensors writes its files 0600, whatever the
    umask that every other file of the export was created under."""
    os.chmod(path, stat.S_IMODE(os.stat(reference).st_mode))


# --------------------------------------------------------------------------- fmt="hf"


def _write_hf(directory: str, config, params, encoding, hf_config: dict) -> None:
    from safetensors.numpy import save_file

    from jaxllm.interop import to_hf

    eot = encoding.eot_token  # HF's defaults (GPT-2's 50256, Llama's 1 and 2) are not this vocabulary's
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**hf_config, "bos_token_id": eot, "eos_token_id": eot}, f, indent=2)
    # "pt": transformers refuses safetensors files that do not say which framework wrote them
    save_file(to_hf(config, params), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    _mode_like(os.path.join(directory, "model.safetensors"), os.path.join(directory, "config.json"))
    _write_hf_tokenizer(directory, encoding, config.context_limit)


def hf_tokenizer(encoding):
    """A tiktoken byte-level BPE -> the ``tokenizers.Tokenizer`` that gives the same ids.

    Vocabulary and merges in GPT-2's byte-to-character form; every split of a token into two
    tokens is a merge, ranked by the token's own rank, which is tiktoken's rule (merge the adjacent
    pair whose concatenation ranks lowest); ``ignore_merges`` takes a piece that is a whole token
    directly, as tiktoken does. The pieces are split by the encoding's own regex."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from jaxllm.data.tokenizer import _bytes_to_unicode

    to_char = _bytes_to_unicode()
    ranks = encoding._mergeable_ranks

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges = sorted(((ranks[token], ranks[token[:i]], ranks[token[i:]]), (text(token[:i]), text(token[i:])))
                    for token in ranks for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks)
    vocab = {**{text(token): rank for token, rank in ranks.items()}, **encoding._special_tokens}
    tok = Tokenizer(models.BPE(vocab, [pair for _, pair in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in encoding._special_tokens])
    return tok


def _write_hf_tokenizer(directory: str, encoding, context: int | None) -> None:
    from jaxllm.data.tokenizer import ENDOFTEXT

    hf_tokenizer(encoding).save(os.path.join(directory, "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT,
                # the run encodes "<|endoftext|>" written in a text as ordinary text (data.tokenizer.encode)
                "split_special_tokens": True, "add_prefix_space": False,
                "clean_up_tokenization_spaces": False}  # decode must give back the text unchanged
    if context is not None:
        settings["model_max_length"] = context
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
