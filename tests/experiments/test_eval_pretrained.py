"""`llamoe eval PATH` for every kind of PATH: a Hugging Face directory must give the HF model's own loss on the
same tokens; run directories, checkpoints and converted files give the run's result; missing inputs exit 2."""

from __future__ import annotations

import base64
import json
import random
import weakref
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig, LlamaConfig, LlamaForCausalLM

from llamoe.experiments.commands.eval import cli_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.train.checkpoint import save_checkpoint
from llamoe.experiments.train.model_source import save_checkpoint as save_converted
from llamoe.models.build import build_model
from llamoe.models.hf import HFStateDict, read_hf_config
from llamoe.models.safetensors_dir import SafetensorsDir

LENGTH = 32
MERGES = [b"th", b"he", b"the", b" the", b"at", b" c", b"an", b"in", b" s", b"on", b"ar", b" m"]


def write_tokenizer(path: Path) -> Path:
    """A tiny tiktoken `tokenizer.model` (256 byte tokens + merges), in Meta's file format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def write_text(path: Path, lines: int = 40) -> Path:
    words = "the cat sat on a mat and then the small dog ran in the park at night".split()
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)) + "\n")
    return path


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Weights far from the small init, so a wrong token or a wrong weight shows in the loss."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.normal_(1.0, 0.2, generator=gen) if p.dim() == 1 else p.normal_(0.0, 0.15, generator=gen)


def llama(vocab: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def llama4(vocab: int) -> Llama4ForCausalLM:
    """MoE every 2nd layer, NoPE every 2nd layer, chunk 8, QK-norm and temperature from position 7."""
    no_rope = [1, 0, 1, 0]
    cfg = Llama4TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, no_rope_layers=no_rope,
        attention_chunk_size=8, layer_types=["chunked_attention" if r else "full_attention" for r in no_rope],
        moe_layers=[1, 3], interleave_moe_layer_step=2, num_local_experts=4, num_experts_per_tok=1,
        use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8, attn_scale=0.5, tie_word_embeddings=False,
    )  # fmt: skip
    return Llama4ForCausalLM(cfg).eval()


def hf_dir(tmp_path: Path, hf: torch.nn.Module, tokenizer: Path | None, where: str) -> Path:
    """save_pretrained, and Meta's tokenizer file at `where` inside the directory (as HF repositories ship it)."""
    randomize(hf)
    directory = tmp_path / "hf"
    hf.save_pretrained(directory)
    if tokenizer is not None:
        (directory / where).parent.mkdir(parents=True, exist_ok=True)
        (directory / where).write_bytes(tokenizer.read_bytes())
    return directory


def hf_reference(
    hf: torch.nn.Module, tokenizer: Tokenizer, text: Path, length: int, bos: bool = True
) -> tuple[float, int]:
    """The HF model's own loss over the windows the evaluation reads: the text file is one document (its tokens then
    eos), cut into consecutive windows; each is bos then `length` tokens (`llamoe eval`'s default for a pretrained
    model whose tokenizer starts texts with bos), or `length + 1` tokens without bos. All windows but the last (kept
    for calibration) are scored."""
    ids = tokenizer.encode(text.read_text()) + [tokenizer.eos_id]
    head = [tokenizer.bos_id] if bos else []
    span = length + 1 - len(head)  # text tokens per window
    n = len(ids) // span - 1
    windows = torch.tensor([head + ids[i * span : (i + 1) * span] for i in range(n)])
    with torch.no_grad():
        return float(hf(input_ids=windows, labels=windows).loss), n


def run_eval(directory: Path, text: Path, tmp_path: Path, n: int, *extra: str) -> dict[str, Any]:
    out = tmp_path / "out"
    args = [str(directory), "--lengths", str(LENGTH), "evals=[ppl]", f"sequences={n}", "calibration_sequences=1",
            "plots=false", f"data.source={text}", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out), *extra]  # fmt: skip
    assert cli_main(args) == 0
    return json.loads((out / "long_context.json").read_text())


@pytest.mark.parametrize(("make", "kind", "where"), [(llama, "llama3", "tokenizer.model"),
                                                      (llama4, "llama4", "original/tokenizer.model")])  # fmt: skip
def test_eval_of_an_hf_directory_is_the_hf_models_own_loss(make, kind: str, where: str, tmp_path: Path) -> None:
    tokenizer_file = write_tokenizer(tmp_path / "tok" / "tokenizer.model")
    tokenizer = Tokenizer.from_file(tokenizer_file, kind=kind)
    hf = make(vocab=tokenizer.vocab_size + 20)
    directory = hf_dir(tmp_path, hf, tokenizer_file, where)
    text = write_text(tmp_path / "text.txt")
    loss, n = hf_reference(hf, tokenizer, text, LENGTH)
    assert n >= 8
    result = run_eval(directory, text, tmp_path, n)
    assert result["model_kind"] == "hf" and result["details"]["settings"]
    assert result[f"nll@{LENGTH}"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize(("make", "generation", "vocab"), [(llama, "llama3", 128256), (llama4, "llama4", 202048)])
def test_a_real_meta_tokenizer_gives_the_hf_loss_too(
    make, generation: str, vocab: int, tmp_path: Path, meta_tokenizer
) -> None:
    tokenizer_file = meta_tokenizer(generation)
    tokenizer = Tokenizer.from_file(tokenizer_file, kind=generation)
    hf = make(vocab=vocab)
    directory = hf_dir(tmp_path, hf, tokenizer_file, "original/tokenizer.model")
    text = write_text(tmp_path / "text.txt", lines=120)
    loss, n = hf_reference(hf, tokenizer, text, LENGTH)
    assert result_nll(run_eval(directory, text, tmp_path, n)) == pytest.approx(loss, abs=1e-5)


def result_nll(result: Mapping[str, Any]) -> float:
    return result[f"nll@{LENGTH}"]


def test_the_tokenizer_can_be_given_and_its_absence_exits_2(tmp_path: Path, capsys) -> None:
    tokenizer_file = write_tokenizer(tmp_path / "tok" / "tokenizer.model")
    hf = llama(vocab=600)
    directory = hf_dir(tmp_path, hf, None, "")
    text = write_text(tmp_path / "text.txt")
    loss, n = hf_reference(hf, Tokenizer.from_file(tokenizer_file), text, LENGTH)
    assert cli_main([str(directory), "--lengths", "32", f"data.source={text}"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert result_nll(run_eval(directory, text, tmp_path, n, f"tokenizer={tokenizer_file}")) == pytest.approx(
        loss, abs=1e-5
    )
    assert cli_main([str(directory), "--lengths", "32", f"tokenizer={tokenizer_file}"]) == 2  # no text
    assert "data.source" in capsys.readouterr().err
    assert cli_main([str(directory), f"tokenizer={tokenizer_file}", f"data.source={text}"]) == 2  # no length
    assert "train_len" in capsys.readouterr().err
    assert cli_main([str(directory), "--lengths", "32", f"data.source={text}", "tokenizer=byte_level",
                     "sequences=2", "plots=false"]) == 0  # fmt: skip
    small = llama(vocab=300)  # fewer ids than the byte-level tokenizer's 320
    small_dir = hf_dir(tmp_path / "small", small, None, "")
    assert cli_main([str(small_dir), "--lengths", "32", f"data.source={text}", "tokenizer=byte_level"]) == 2
    assert "320 ids" in capsys.readouterr().err


def test_bfloat16_evaluates_close_to_float32(tmp_path: Path) -> None:
    tokenizer_file = write_tokenizer(tmp_path / "tok" / "tokenizer.model")
    hf = llama(vocab=600)
    directory = hf_dir(tmp_path, hf, tokenizer_file, "tokenizer.model")
    text = write_text(tmp_path / "text.txt")
    loss, n = hf_reference(hf, Tokenizer.from_file(tokenizer_file), text, LENGTH)
    half = result_nll(run_eval(directory, text, tmp_path, n, "--dtype", "bfloat16"))
    assert half != loss and half == pytest.approx(loss, abs=0.05)


def test_an_hf_directory_loads_one_tensor_at_a_time(tmp_path: Path) -> None:
    """The model is filled from memory-mapped safetensors without collecting the tensors it reads: when a tensor is
    read, at most the one before it is still alive (the caller's previous loop value)."""
    hf = llama4(vocab=300)
    directory = hf_dir(tmp_path, hf, None, "")
    cfg = read_hf_config(str(directory))

    class Spy(Mapping[str, torch.Tensor]):
        def __init__(self, inner: Mapping[str, torch.Tensor]) -> None:
            self.inner, self.seen, self.alive_at_read = inner, [], []

        def __getitem__(self, key: str) -> torch.Tensor:
            self.alive_at_read.append(sum(ref() is not None for ref in self.seen))
            value = self.inner[key]
            self.seen.append(weakref.ref(value))
            return value

        def __iter__(self):
            return iter(self.inner)

        def __len__(self) -> int:
            return len(self.inner)

    spy = Spy(HFStateDict(SafetensorsDir(directory), cfg))
    model = build_model(cfg, state_dict=spy)
    assert len(spy.seen) == len(model.state_dict()) and max(spy.alive_at_read) <= 1
    for key, value in hf.state_dict().items():  # and it is the HF model
        if key.endswith("embed_tokens.weight"):
            assert torch.equal(model.tok_embeddings.weight, value)


def make_run(tmp_path: Path, text: Path) -> Path:
    run_dir = tmp_path / "run"
    cfg = load_run_config(None, [f"run_dir={run_dir}", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
                                 "model.multiple_of=32", f"data.source={text}", "data.val_fraction=0.5",
                                 f"data.cache_dir={tmp_path / 'cache'}", "train.seq_len=32"])  # fmt: skip
    model = build_model(cfg.model, seed=4)
    randomize(model)
    save_checkpoint(run_dir, 7, model_state=model.state_dict(), rank_state={}, meta={}, config_yaml=cfg.to_yaml())
    save_converted(cfg.model, model.state_dict(), str(tmp_path / "converted.pt"))
    return run_dir


def test_a_run_its_checkpoint_its_model_pt_and_a_converted_file_evaluate_alike(tmp_path: Path) -> None:
    text = write_text(tmp_path / "text.txt", lines=200)
    run_dir = make_run(tmp_path, text)
    step = run_dir / "checkpoints" / "step_7"
    common = ["--lengths", "32", "evals=[ppl]", "sequences=4", "plots=false"]
    assert cli_main([str(run_dir), *common]) == 0
    by_run = json.loads((run_dir / "eval" / "long_context.json").read_text())
    assert (by_run["run_dir"], by_run["model_kind"], by_run["step"]) == (str(run_dir), "run", 7)
    for path in (step, step / "model.pt"):
        assert cli_main([str(path), *common]) == 0
        result = json.loads((run_dir / "eval" / "step_7" / "long_context.json").read_text())
        assert result["model_kind"] == "checkpoint" and result["step"] == 7
        assert result["nll@32"] == by_run["nll@32"]  # same weights, same held-out split
    # a converted file has no run: its text (whole) and tokenizer are inputs; the text is the same file here
    whole = [*common, f"data.source={text}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert cli_main([str(run_dir), *whole, "--out", str(tmp_path / "a")]) == 0
    assert cli_main([str(tmp_path / "converted.pt"), *whole, "tokenizer=byte_level"]) == 0
    a = json.loads((tmp_path / "a" / "long_context.json").read_text())
    b = json.loads((tmp_path / "converted_eval" / "long_context.json").read_text())
    assert b["model_kind"] == "file" and a["nll@32"] == b["nll@32"] != by_run["nll@32"]


def test_a_path_that_is_no_model_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert cli_main([str(tmp_path / "notes.txt"), "--lengths", "32"]) == 2
    assert "is not a" in capsys.readouterr().err
    assert cli_main([str(tmp_path / "missing"), "--lengths", "32"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.gpu
@pytest.mark.slow
def test_a_full_width_llama_loads_on_the_gpu_without_a_host_copy(tmp_path: Path) -> None:
    """Llama 3.1 8B's real widths (2 of its 32 layers: 1.5B parameters, 3 GB in bf16) go from safetensors to the GPU
    one tensor at a time: host anonymous memory never grows by the model's size, and `llamoe eval` runs on it."""
    import threading
    from dataclasses import replace

    from llamoe.experiments.train.model_source import open_source
    from llamoe.models import presets
    from llamoe.models.hf import save_hf

    cfg = replace(presets.get("llama3.1-8b"), n_layers=2)
    saved = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    save_hf(saved, str(tmp_path / "hf"))
    nbytes = sum(t.numel() * t.element_size() for t in saved.state_dict().values())
    reference = {k: saved.state_dict()[k].clone() for k in ("tok_embeddings.weight", "layers.1.attention.wq.weight")}
    del saved
    torch.cuda.empty_cache()

    base, peak, done = _rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_bytes() - base)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model = open_source(tmp_path / "hf").load(device="cuda", dtype=torch.bfloat16)
    done.set()
    sampler.join()
    assert peak[0] < nbytes / 3, (peak[0], nbytes)  # a host copy would be >= nbytes (2x that in fp32)
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key
    text = write_text(tmp_path / "text.txt", lines=400)
    args = [str(tmp_path / "hf"), "--device", "cuda", "--dtype", "bfloat16", "--lengths", "256", "evals=[ppl]",
            "sequences=2", "plots=false", "tokenizer=byte_level", f"data.source={text}",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert cli_main(args) == 0


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_tokenizer_json_is_found_and_bos_follows_its_convention(adds_bos: bool, tmp_path: Path) -> None:
    """An HF directory with only tokenizer.json: `llamoe eval` reads it, starts each window with bos when the
    tokenizer starts texts with one (eval.long_context.bos=null), and gives the HF loss on those windows."""
    from tests.experiments.test_hf_tokenizer import write_hf_tokenizer

    tokenizer_file = write_hf_tokenizer(tmp_path / "tok", adds_bos=adds_bos)
    tokenizer = Tokenizer.from_file(tokenizer_file, kind="hf")
    hf = llama(vocab=tokenizer.vocab_size + 4)
    directory = hf_dir(tmp_path, hf, tokenizer_file, "tokenizer.json")
    (directory / "tokenizer_config.json").write_bytes((tmp_path / "tok" / "tokenizer_config.json").read_bytes())
    text = write_text(tmp_path / "text.txt", lines=80)
    loss, n = hf_reference(hf, tokenizer, text, LENGTH, bos=adds_bos)
    result = run_eval(directory, text, tmp_path, n)
    assert result["details"]["options"]["bos"] is adds_bos
    assert result_nll(result) == pytest.approx(loss, abs=1e-5)
    other, m = hf_reference(hf, tokenizer, text, LENGTH, bos=not adds_bos)
    assert result_nll(run_eval(directory, text, tmp_path, m, f"bos={str(not adds_bos).lower()}")) == pytest.approx(
        other, abs=1e-5
    )
    assert abs(other - loss) > 1e-3  # the two conventions are told apart


def test_bos_asked_of_a_tokenizer_without_one_exits_2(tmp_path: Path, capsys) -> None:
    from tests.experiments.test_hf_tokenizer import write_hf_tokenizer

    tokenizer_file = write_hf_tokenizer(tmp_path / "tok", adds_bos=False, config={"eos_token": "</s>"})
    directory = hf_dir(tmp_path, llama(vocab=320), tokenizer_file, "tokenizer.json")
    args = [str(directory), "--lengths", "32", f"data.source={write_text(tmp_path / 't.txt')}", "bos=true"]
    assert cli_main([*args, f"tokenizer={tokenizer_file}"]) == 2
    err = capsys.readouterr().err
    assert "eval.long_context.bos" in err and "Traceback" not in err


def test_model_settings_on_the_command_line_convert_zero_shot(tmp_path: Path, capsys) -> None:
    """model.<field>=... changes the evaluated model's settings (a zero-shot RoPE -> iRoPE conversion); a setting that
    changes a weight's shape is refused."""
    tokenizer_file = write_tokenizer(tmp_path / "tok" / "tokenizer.model")
    hf = llama(vocab=600)
    directory = hf_dir(tmp_path, hf, tokenizer_file, "tokenizer.model")
    text = write_text(tmp_path / "text.txt")
    loss, n = hf_reference(hf, Tokenizer.from_file(tokenizer_file), text, LENGTH)
    irope = ["model.attention.nope_layer_interval=2", "model.attention.chunk_size=8"]
    converted = result_nll(run_eval(directory, text, tmp_path, n, *irope))
    assert converted != pytest.approx(loss, abs=1e-3)
    assert result_nll(run_eval(directory, text, tmp_path, n)) == pytest.approx(loss, abs=1e-5)
    assert cli_main([str(directory), "--lengths", "32", f"data.source={text}", "model.n_heads=2"]) == 1
    assert "does not match" in capsys.readouterr().err
    assert cli_main([str(directory), "--lengths", "32", f"data.source={text}", "model.attention.nope=2"]) == 2
    assert "model.attention.nope" in capsys.readouterr().err
