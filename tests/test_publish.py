"""Hub-complete folders and pushing them, against a Hub-compatible endpoint on 127.0.0.1."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from conftest import command_stderr_lines
from hub_server import TOKEN, FakeHub, metadata_errors
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from lm_lstm.hub import check_hub_ready, files_to_upload
from lm_lstm.arguments import DataArguments, LSTMTrainingArguments, ModelArguments
from lm_lstm.training import train

EXPECTED = {"config.json", "model.safetensors", "configuration_lstm.py", "modeling_lstm.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md", "training_curve.png"}


def tiny_training_arguments(output_dir, **overrides):
    arguments = dict(output_dir=str(output_dir), max_steps=6, save_steps=3, eval_steps=3, logging_steps=3, bf16=False,
                     per_device_train_batch_size=8, warmup_steps=1, report_to="tensorboard", disable_tqdm=True)
    arguments.update(overrides)
    return LSTMTrainingArguments(**arguments)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("publish")
    (root / "train.txt").write_text(shakespeare_text[:20_000])
    output = root / "model"
    train(ModelArguments(tokenizer_type="char", embedding_size=16, hidden_size=32),
          DataArguments(train_file=[str(root / "train.txt")], block_size=32), tiny_training_arguments(output))
    return output


def hub_env(hub, tmp_path, token=TOKEN, offline="0"):
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE=offline, HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_OFFLINE=offline)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args, env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_folder_is_hub_complete(model_folder):
    check_hub_ready(model_folder)
    upload = set(files_to_upload(model_folder))
    assert EXPECTED <= upload
    assert (model_folder / "checkpoint-3").is_dir()
    assert json.loads((model_folder / "training_args.json").read_text())["max_steps"] == 6
    assert not any(p.startswith(("checkpoint-", "runs")) or p.endswith(".bin") for p in upload), upload
    assert {"runs", "trainer_state.json"} & {p.split("/")[0] for p in files_to_upload(model_folder, include_logs=True)}
    config = json.loads((model_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lstm.LSTMForCausalLM"


def is_pickle(path) -> bool:
    """A raw pickle (protocol 2+) or a `torch.save` archive (a zip holding data.pkl)."""
    head = path.read_bytes()[:2]
    return head[:1] == b"\x80" or (head == b"PK" and zipfile.is_zipfile(path)
                                     and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()))


def test_no_pickle_in_the_model_folder_nor_in_any_upload(model_folder):
    assert not [p.name for p in model_folder.iterdir() if p.is_file() and is_pickle(p)]
    assert any(is_pickle(p) for p in (model_folder / "checkpoint-3").iterdir())  # the check finds torch.save files
    for options in ({}, {"include_checkpoints": True, "include_logs": True}):
        assert not [f for f in files_to_upload(model_folder, **options) if is_pickle(model_folder / f)]


def test_card_numbers_come_from_the_run(model_folder):
    card = ModelCard.load(model_folder / "README.md")
    assert metadata_errors(str(card)) == []
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    final = json.loads((model_folder / "eval_results.json").read_text())
    assert results["perplexity"] == pytest.approx(final["eval_perplexity"], rel=1e-6)
    assert card.data.datasets is None and card.data.license == "apache-2.0"
    assert "| steps | 6 (" in card.text and "train.txt" in card.text


def test_push_uploads_the_folder_and_a_fresh_process_loads_it(model_folder, tmp_path):
    with FakeHub() as hub:
        result = run(["-m", "lm_lstm.cli", "push", str(model_folder), "--repo-id", "alice/tiny-lstm"],
                     hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        uploaded = hub.files("alice/tiny-lstm")
        assert set(uploaded) == set(files_to_upload(model_folder))
        assert uploaded["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()

        model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
        script = textwrap.dedent(f"""
            import sys
            sys.modules["lm_lstm"] = None
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            model = AutoModelForCausalLM.from_pretrained("alice/tiny-lstm", trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained("alice/tiny-lstm", trust_remote_code=True)
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=0, rtol=0)
            assert tokenizer.eos_token == "</s>"
            print("loaded from the hub")
        """)
        loaded = run(["-c", script], hub_env(hub, tmp_path))
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert "loaded from the hub" in loaded.stdout


def test_push_to_a_private_repo_and_a_branch(model_folder, tmp_path):
    with FakeHub() as hub:
        result = run(["-m", "lm_lstm.cli", "push", str(model_folder), "--repo-id", "alice/secret", "--private",
                      "--revision", "v1"], hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.repos["alice/secret"]["private"]
        assert "README.md" in hub.files("alice/secret", "v1")


@pytest.mark.parametrize("token, offline, message", [
    (TOKEN, "1", "offline mode is on"),
    (None, "0", "log in with `hf auth login` or set HF_TOKEN"),
])
def test_push_failures_are_one_line_and_change_nothing(model_folder, tmp_path, token, offline, message):
    before = sorted(p.relative_to(model_folder) for p in model_folder.rglob("*"))
    with FakeHub() as hub:
        result = run(["-m", "lm_lstm.cli", "push", str(model_folder), "--repo-id", "alice/x"],
                     hub_env(hub, tmp_path, token=token, offline=offline))
        assert not hub.repos
    assert result.returncode != 0
    lines = command_stderr_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.relative_to(model_folder) for p in model_folder.rglob("*")) == before


def test_push_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run(["-m", "lm_lstm.cli", "push", str(tmp_path), "--repo-id", "alice/x"], dict(os.environ))
    assert result.returncode != 0 and "missing" in result.stderr and len(command_stderr_lines(result.stderr)) == 1


def test_push_to_hub_during_training(shakespeare_text, tmp_path):
    (tmp_path / "train.txt").write_text(shakespeare_text[:20_000])
    with FakeHub() as hub:
        result = run(["-m", "lm_lstm.cli", "train", "--train_file", str(tmp_path / "train.txt"), "--output_dir",
                      str(tmp_path / "out"), "--tokenizer_type", "char", "--embedding_size", "16", "--hidden_size",
                      "32", "--block_size", "32", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
                      "--bf16", "False", "--push_to_hub", "--hub_model_id", "alice/trained"], hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        uploaded = hub.files("alice/trained")
    assert EXPECTED <= set(uploaded)
    assert not any(name.startswith("checkpoint-") or name.endswith(".bin") for name in uploaded)
    assert b"model-index" in uploaded["README.md"] and b"alice/trained" in uploaded["README.md"]
