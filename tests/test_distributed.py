"""Pretraining and finetuning as several processes on this CPU (gloo), launched as users launch them: `torchrun`,
`accelerate launch`, or one process per rank started by hand (as on several machines). Offline, tiny models.

Dropout is off in the runs that are compared across process counts: N processes with the same seed draw their dropout
masks from N copies of one RNG stream, one process draws them from one stream, so with dropout the runs would differ
by design, not by a bug.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402
from test_pretrain_mlm import SCRIPT, TINY, environment, history, sentences, train_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "scripts" / "finetune_glue.py"
NO_DROPOUT = TINY + ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"
STEPS = 40

spec = importlib.util.spec_from_file_location("pretrain_mlm", SCRIPT)
pretrain_mlm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain_mlm)


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, and a tokenizer trained on it by a one-step run of the script."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "train.txt").write_text("\n".join(sentences(1500, seed=0)) + "\n")
    (root / "validation.txt").write_text("\n".join(sentences(300, seed=1)) + "\n")
    run([sys.executable], root, root / "tokenizer", 8, "--train_tokenizer", "--vocab_size", "400",
        "--max_train_steps", "1")  # fmt: skip
    return root


def arguments(work: Path, output_dir: Path, batch: int, *extra: str) -> list[str]:
    tokenizer = [] if "--train_tokenizer" in extra else ["--tokenizer_name", str(work / "tokenizer")]
    return [
        str(SCRIPT), "--output_dir", str(output_dir), *tokenizer,
        "--train_file", str(work / "train.txt"), "--validation_file", str(work / "validation.txt"),
        "--preset", "luna-small", "--config_overrides", NO_DROPOUT, "--max_seq_length", "32",
        "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "16", "--max_eval_samples", "32",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "7", "--max_train_steps", str(STEPS),
        "--checkpointing_steps", "4", "--checkpoints_total_limit", "3", *extra,
    ]  # fmt: skip


def run(launcher, work, output_dir, batch, *extra, check=True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*launcher, *arguments(work, output_dir, batch, *extra)],
        env={**environment(work), **(env or {})}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def one_process(work):
    """One process, global batch 8."""
    output_dir = work / "one"
    run([sys.executable], work, output_dir, 8)
    return output_dir


@pytest.fixture(scope="module")
def two_processes(work):
    """torchrun, 2 processes of batch 4 (global batch 8), no environment variable set: must form one gloo job."""
    output_dir = work / "two"
    result = run(torchrun(2), work, output_dir, 4)
    return output_dir, result.stderr


DATA_DRIVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import HfArgumentParser
from pretrain_mlm import Arguments, make_accelerator, prepare_data
(args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=sys.argv[3:])
accelerator = make_accelerator(args)
_, train_dataloader, _ = prepare_data(args, accelerator)
train_dataloader = accelerator.prepare(train_dataloader)
batches = [batch for _, batch in zip(range(3), train_dataloader)]
torch.save(batches, f"{sys.argv[2]}.{accelerator.process_index}.pt")
"""


def test_each_process_gets_its_own_half_of_the_one_process_batches(work, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DATA_DRIVER)
    for launcher, batch, name in (([sys.executable], 8, "one"), (torchrun(2), 4, "two")):
        script_arguments = arguments(work, tmp_path / name, batch)[1:]
        result = subprocess.run(
            [*launcher, str(driver), str(SCRIPT.parent), str(tmp_path / name), *script_arguments],
            env=environment(work), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
    whole = torch.load(tmp_path / "one.0.pt")
    halves = [torch.load(tmp_path / f"two.{rank}.pt") for rank in (0, 1)]
    for step in range(3):
        first, second = (half[step] for half in halves)
        assert first["input_ids"].shape == second["input_ids"].shape == (4, 32)
        assert not set(map(tuple, first["input_ids"].tolist())) & set(map(tuple, second["input_ids"].tolist()))
        for key in ("input_ids", "labels"):  # the same blocks, masked the same way, in the same order
            assert torch.equal(torch.cat([first[key], second[key]]), whole[step][key]), (step, key)
    assert (whole[0]["labels"] != -100).any()


def test_two_processes_train_as_one_process_with_the_global_batch(one_process, two_processes):
    two, log = two_processes
    assert "Distributed environment: DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    # Both runs log the mean loss over every masked token of the global batch. They differ only by the order in
    # which floating-point sums are taken (two half-batch gradients all-reduced vs one whole-batch gradient).
    single, double = train_losses(one_process), train_losses(two)
    assert sorted(double) == list(range(1, STEPS + 1))
    assert [double[step] for step in single] == pytest.approx(list(single.values()), rel=1e-5)
    assert single[STEPS] < single[1] - 1.0  # it did learn
    assert [r["tokens_seen"] for r in history(two) if "train_loss" in r][:2] == [256, 512]
    final = [json.loads((folder / "all_results.json").read_text()) for folder in (one_process, two)]
    assert final[1]["eval_loss"] == pytest.approx(final[0]["eval_loss"], rel=1e-5)


def test_every_process_holds_the_weights_the_main_process_saved(one_process, two_processes):
    from luna_hf import LunaForMaskedLM

    two, log = two_processes
    fingerprint = json.loads((two / "all_results.json").read_text())["weights_sha256"]
    assert f"Weights identical on all 2 processes (sha256 {fingerprint})" in log
    saved = LunaForMaskedLM.from_pretrained(two)
    assert pretrain_mlm.weights_fingerprint(saved) == fingerprint
    reference = LunaForMaskedLM.from_pretrained(one_process).state_dict()
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-4)


def test_two_processes_killed_with_sigkill_resume_as_if_uninterrupted(work, two_processes):
    uninterrupted, _ = two_processes
    output_dir = work / "killed"
    process = subprocess.Popen(
        [*torchrun(2), *arguments(work, output_dir, 4)], env=environment(work),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (output_dir / "checkpoints" / "step_8").exists():
        assert process.poll() is None, "the run ended before its second checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers, as when a machine goes down
    process.wait()
    assert not (output_dir / "all_results.json").exists(), "the run finished before it could be killed"
    resumed_from = max(int(path.name[5:]) for path in (output_dir / "checkpoints").glob("step_*"))

    run(torchrun(2), work, output_dir, 4, "--resume_from_checkpoint", "latest")
    resumed, reference = train_losses(output_dir), train_losses(uninterrupted)
    later = range(resumed_from + 1, STEPS + 1)
    assert [resumed[step] for step in later] == pytest.approx([reference[step] for step in later], rel=1e-6)
    final = [json.loads((folder / "all_results.json").read_text()) for folder in (output_dir, uninterrupted)]
    assert final[0]["weights_sha256"] == final[1]["weights_sha256"]


def test_a_dead_rank_stops_the_others_and_the_last_checkpoint_resumes(work, tmp_path):
    """Each rank started by hand, as on separate machines: no launcher is there to stop the survivors."""
    output_dir = tmp_path / "dead"
    command = arguments(work, output_dir, 4, "--max_train_steps", "5000", "--ddp_timeout", "60")
    port = str(29_400 + os.getpid() % 500)
    ranks = [
        subprocess.Popen(
            [sys.executable, *command],
            env={
                **environment(work),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "2",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 240
        while not (output_dir / "checkpoints" / "step_8").exists():
            assert all(rank.poll() is None for rank in ranks), ranks[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ranks[1].send_signal(signal.SIGKILL)
        _, stderr = ranks[0].communicate(timeout=90)  # well within --ddp_timeout's 60 s plus start-up
    finally:
        for rank in ranks:
            rank.kill()
    assert ranks[0].returncode != 0
    last = max((output_dir / "checkpoints").glob("step_*"), key=lambda path: int(path.name[5:]))
    assert "Process 0: another process of the job failed or stopped answering" in stderr, stderr[-3000:]
    assert f"The last complete checkpoint is {last}: relaunch all processes with --resume_from_checkpoint latest" in (
        stderr
    )
    step = int(last.name[5:])
    run(torchrun(2), work, output_dir, 4, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 4))
    assert json.loads((output_dir / "all_results.json").read_text())["step"] == step + 4


def test_resume_with_other_batches_is_refused(work, two_processes):
    output_dir = work / "mismatch"
    shutil.copytree(two_processes[0], output_dir)
    failed = run([sys.executable], work, output_dir, 8, "--resume_from_checkpoint", "latest", check=False)
    assert failed.returncode != 0
    assert f"Checkpoint {output_dir / 'checkpoints' / f'step_{STEPS}'} was saved by a run with other batches" in (
        failed.stderr
    )
    assert "per_device_train_batch_size 4 -> 8, num_processes 2 -> 1" in failed.stderr


def test_fsdp_config_on_cpu_is_refused_not_silently_ddp(work, tmp_path):
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "scripts" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
    ]  # fmt: skip
    failed = run(launcher, work, tmp_path / "fsdp", 4, check=False)
    assert failed.returncode != 0
    assert "accelerate applies FSDP on GPUs only and would silently run plain DDP on CPU" in failed.stderr
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


FSDP_DRIVER = """
import sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from luna_hf import LunaConfig, LunaForMaskedLM

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = LunaForMaskedLM(LunaConfig(**CONFIG))
for layer in model.luna.layers:  # one shard unit per LunaLayer, as accelerate's TRANSFORMER_BASED_WRAP does
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
torch.manual_seed(1)
input_ids = torch.randint(5, 100, (4, 24))
losses = []
for _ in range(3):
    loss = model(input_ids=input_ids[2 * rank : 2 * rank + 2], labels=input_ids[2 * rank : 2 * rank + 2]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
    losses.append(loss.item())
weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({"losses": losses, "weights": weights}, sys.argv[1])
dist.destroy_process_group()
"""
FSDP_CONFIG = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    projected_length=8, max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip


def test_fsdp2_fully_shard_trains_luna_with_gloo_like_one_process(tmp_path):
    """torch's FSDP2 on CPU: 2 ranks, each half the batch, reproduce one unsharded process on the whole batch."""
    from luna_hf import LunaConfig, LunaForMaskedLM

    driver = tmp_path / "fsdp.py"
    driver.write_text(FSDP_DRIVER.replace("**CONFIG", f"**{FSDP_CONFIG!r}"))
    result = subprocess.run(
        [*torchrun(2), str(driver), str(tmp_path / "fsdp.pt")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = torch.load(tmp_path / "fsdp.pt")

    torch.manual_seed(0)
    model = LunaForMaskedLM(LunaConfig(**FSDP_CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    input_ids = torch.randint(5, 100, (4, 24))
    losses = []
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss  # every token scored: equal counts per rank
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sharded["losses"] == pytest.approx(losses, rel=1e-5)
    assert losses[2] < losses[0]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(sharded["weights"][name], tensor, rtol=0, atol=1e-5)


def finetune(launcher, work, output_dir, batch) -> dict:
    glue = work / "glue"
    result = subprocess.run(
        [*launcher, str(FINETUNE), "--model_name_or_path", str(work / "luna-mlm"), "--task_name", "sst2",
         "--train_file", str(glue / "sst2" / "train.tsv"), "--validation_file", str(glue / "sst2" / "dev.tsv"),
         "--do_train", "--do_eval", "--max_steps", "6", "--per_device_train_batch_size", str(batch),
         "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "1", "--seed", "3",
         "--max_seq_length", "32", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
         "--output_dir", str(output_dir)],
        env=environment(work), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {
        "losses": [record["loss"] for record in state["log_history"] if "loss" in record],
        "eval": json.loads((output_dir / "eval_results.json").read_text()),
        "state": state,
    }


def test_finetuning_with_the_trainer_under_two_processes(work, tmp_path):
    from luna_hf import LunaForMaskedLM, LunaForSequenceClassification

    hub_fixture.write_glue_fixture(work / "glue")
    hub_fixture.save_tiny_model(
        LunaForMaskedLM, work / "luna-mlm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    one = finetune([sys.executable], work, tmp_path / "one", 8)
    two = finetune(torchrun(2), work, tmp_path / "two", 4)
    # 6 steps of 4 rows per process cover the 48 rows once only if the 2 processes are one job (8 rows a step).
    assert (two["state"]["train_batch_size"], two["state"]["epoch"]) == (4, 1.0)
    assert len(two["losses"]) == len(one["losses"]) == 6
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], rel=1e-4)
    weights = [LunaForSequenceClassification.from_pretrained(tmp_path / name).state_dict() for name in ("one", "two")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-4)
