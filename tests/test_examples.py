"""The example scripts, the upstream-script contract, and multi-process (DDP on CPU) training."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lm_lstm


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--embedding_size", "16", "--hidden_size", "32", "--block_size", "32"]
NO_DROPOUT = ["--input_dropout", "0", "--hidden_dropout", "0", "--output_dropout", "0", "--weight_dropout", "0"]


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("examples") / "train.txt"
    path.write_text(shakespeare_text[:30_000])
    return path


@pytest.fixture(scope="module")
def scratch_model(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("run_clm") / "scratch"
    run(sys.executable, EXAMPLES / "run_clm.py", "--train_file", corpus, "--tokenizer_type", "char", "--do_train",
        "--do_eval", "--output_dir", output, "--config_overrides", "embedding_size=16,hidden_size=24",
        "--block_size", 32, "--max_steps", 6, "--eval_steps", 3, "--save_steps", 3, "--bf16", "False")
    return output


def check_results(folder: Path) -> None:
    train_results = json.loads((folder / "train_results.json").read_text())
    eval_results = json.loads((folder / "eval_results.json").read_text())
    all_results = json.loads((folder / "all_results.json").read_text())
    assert "train_loss" in train_results
    assert eval_results["perplexity"] == pytest.approx(torch.tensor(eval_results["eval_loss"]).exp().item(), rel=1e-5)
    assert all_results["perplexity"] == eval_results["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model(**tokenizer("ROMEO:", return_tensors="pt")).logits.shape[-1] == len(tokenizer)


def test_run_clm_from_scratch(scratch_model):
    check_results(scratch_model)
    config = json.loads((scratch_model / "config.json").read_text())
    assert config["hidden_size"] == 24 and config["embedding_size"] == 16  # --config_overrides applied


def test_run_clm_fine_tunes_a_saved_folder(scratch_model, corpus, tmp_path):
    output = tmp_path / "tuned"
    run(sys.executable, EXAMPLES / "run_clm.py", "--model_name_or_path", scratch_model, "--train_file", corpus,
        "--do_train", "--do_eval", "--output_dir", output, "--block_size", 32, "--max_steps", 4, "--eval_steps", 2,
        "--save_steps", 2, "--bf16", "False", "--learning_rate", "1e-3")
    check_results(output)
    before, after = load_file(scratch_model / "model.safetensors"), load_file(output / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_accelerate_loop_resumed_from_a_checkpoint_ends_with_the_same_weights(corpus, tmp_path):
    def loop(output, *extra):
        run(sys.executable, EXAMPLES / "run_clm_no_trainer.py", "--train_file", corpus, "--tokenizer_type", "char",
            *TINY, "--output_dir", output, "--max_train_steps", 6, "--checkpointing_steps", 3,
            "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 2, "--seed", 5, *extra)
        return load_file(output / "model.safetensors")

    uninterrupted = loop(tmp_path / "a", "--with_tracking")
    assert (tmp_path / "a" / "step_3").is_dir() and list((tmp_path / "a").rglob("events.out.tfevents.*"))
    results = json.loads((tmp_path / "a" / "all_results.json").read_text())
    assert results["step"] == 6 and results["perplexity"] > 1
    resumed = loop(tmp_path / "b", "--resume_from_checkpoint", tmp_path / "a" / "step_3")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=0, rtol=0)


def logged_losses(folder: Path, key: str = "loss") -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


# Eight training blocks and a global batch of eight: every step sees all of them, whatever order each sampler picks.
TRAIN_ARGS = ["train", "--tokenizer_type", "char", *TINY, *NO_DROPOUT, "--max_steps", 6, "--logging_steps", 1,
              "--eval_steps", 3, "--save_steps", 3, "--bf16", "False", "--seed", 11, "--report_to", "none",
              "--max_train_samples", 8, "--max_eval_samples", 8]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    """Per-step losses of DDP (2 x 4 blocks, gloo) and one process (8 blocks) agree to 1e-5 (float sums may differ).

    Accelerate's own CPU type (`--cpu --num_processes 2`) starts several processes only through mpirun; its
    torchrun-based launcher (`--multi_gpu`) gives CPU DDP, as does torchrun itself."""
    single = tmp_path / "single"
    run(sys.executable, "-m", "lm_lstm.cli", *TRAIN_ARGS, "--train_file", corpus, "--output_dir", single,
        "--per_device_train_batch_size", 8)
    torchrun = tmp_path / "torchrun"
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29517, "-m",
        "lm_lstm.cli", *TRAIN_ARGS, "--train_file", corpus, "--output_dir", torchrun, "--per_device_train_batch_size", 4)
    accelerate = tmp_path / "accelerate"
    run(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--main_process_port",
        29518, "-m", "lm_lstm.cli", *TRAIN_ARGS, "--train_file", corpus, "--output_dir", accelerate,
        "--per_device_train_batch_size", 4)
    expected = logged_losses(single)
    assert len(expected) == 6
    for folder in (torchrun, accelerate):
        assert logged_losses(folder) == pytest.approx(expected, abs=1e-5)
        assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()


def test_stateful_ddp_gives_each_process_its_own_streams(corpus, tmp_path):
    """--stateful under DDP (2 x 4 streams) sees the same streams, batch after batch, as one process with 8: the
    per-step training losses and the validation losses agree."""
    stateful = [*TRAIN_ARGS, "--stateful", "--max_train_samples", 48, "--max_eval_samples", 16]
    single = tmp_path / "single"
    run(sys.executable, "-m", "lm_lstm.cli", *stateful, "--train_file", corpus, "--output_dir", single,
        "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 4)
    ddp = tmp_path / "ddp"
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29520, "-m",
        "lm_lstm.cli", *stateful, "--train_file", corpus, "--output_dir", ddp, "--per_device_train_batch_size", 4,
        "--per_device_eval_batch_size", 2)
    expected = logged_losses(single)
    assert len(expected) == 6
    assert logged_losses(ddp) == pytest.approx(expected, abs=1e-5)
    assert logged_losses(ddp, "eval_loss") == pytest.approx(logged_losses(single, "eval_loss"), abs=1e-5)


def test_stateful_ddp_resumed_run_ends_with_the_same_weights(corpus, tmp_path):
    """Each process saves its streams' carried state with the checkpoint; resumed, the run continues exactly."""
    stateful = [*TRAIN_ARGS, "--stateful", "--max_train_samples", 48, "--max_eval_samples", 16,
                "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 2, "--load_best_model_at_end", False,
                "--train_file", corpus]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29521, "-m",
           "lm_lstm.cli"]
    run(*ddp, *stateful, "--output_dir", tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert {p.name for p in checkpoint.glob("stream_state_*")} == {"stream_state_0.safetensors",
                                                                    "stream_state_1.safetensors"}
    run(*ddp, *stateful, "--output_dir", tmp_path / "b", "--resume_from_checkpoint", checkpoint)
    uninterrupted, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=0, rtol=0)


def test_accelerate_loop_under_two_processes(corpus, tmp_path):
    run(sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        EXAMPLES / "accelerate_configs" / "cpu_ddp.yaml", "--main_process_port", 29519,
        EXAMPLES / "run_clm_no_trainer.py", "--train_file", corpus, "--tokenizer_type", "char", *TINY,
        "--output_dir", tmp_path / "out", "--max_train_steps", 4, "--per_device_train_batch_size", 4)
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["num_processes"] == 2
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), lm_lstm.LSTMForCausalLM)


@pytest.mark.parametrize("name", ["cpu_ddp.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml"])
def test_accelerate_config_files_load(name):
    config = load_config_from_file(str(EXAMPLES / "accelerate_configs" / name))
    assert config.num_processes >= 2


def test_upstream_run_clm_contract(scratch_model, tmp_path):
    """What transformers' run_clm.py / run_clm_no_trainer.py do with --model_name_or_path DIR --trust_remote_code
    --block_size N, in a process where lm_lstm cannot be imported."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lm_lstm"] = None
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator
        folder = {str(scratch_model)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True)
        assert min(64, tokenizer.model_max_length) == 64  # --block_size is not clamped
        tokenizer.add_special_tokens({{"additional_special_tokens": ["<new>"]}})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        ids = tokenizer(["ROMEO:\\nWhat light through yonder <new> breaks, and"] * 2)["input_ids"]
        block = [ids[0][:16], ids[1][:16]]
        batch = default_data_collator([{{"input_ids": b, "attention_mask": [1] * 16, "labels": b}} for b in block])
        model.train()
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None
        model.save_pretrained({str(tmp_path / "saved")!r})
        tokenizer.save_pretrained({str(tmp_path / "saved")!r})
        again = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True)
        assert again.config.vocab_size == len(tokenizer)
        print("contract ok")
    """)
    assert "contract ok" in run(sys.executable, "-c", script).stdout
