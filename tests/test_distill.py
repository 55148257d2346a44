"""Offline distillation on a real stored signal: batches, compatibility errors, the training loop."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from training.data.labeling import label
from training.data.rollouts import accepted_samples, group_baselines
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.launch.command import DistillCommand, run
from training.launch.report import printed
from training.launch.settings import LaunchSettings
from training.models.checkpoints import load_model, model_card
from training.rounds.online import OnlineRollouts, OnlineSettings
from training.schema.signal import Q8_CODEC, STUDENT_LOGPROB
from training.tasks.arithmetic import problems
from training.trainer.loop import train_student
from training.trainer.losses import sparse_batch
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for, check_compatible


@pytest.fixture(scope="module")
def labeled(tiny_model_dir):
    """A real teacher-signal table: the tiny model labels 48 prompts (it is its own teacher)."""
    engine = HFEngine.load(str(tiny_model_dir), batch_size=16)
    prompts = [p.prompt for p in problems("train", 48, 0)]
    table = label(engine, pa.table({"prompt": prompts}), Sampling(temperature=1.0, max_new_tokens=24), k=8).table
    return table.append_column("sample_id", pa.array([f"s{i}" for i in range(table.num_rows)]))


def test_sparse_batch_reproduces_the_stored_signal(tiny_model_dir, labeled):
    model, tokenizer = load_model(str(tiny_model_dir))
    batch = sparse_batch(labeled.slice(0, 5), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    top = torch.log_softmax(logits[batch.rows, batch.positions], -1).topk(8, -1)
    assert torch.equal(top.indices, batch.topk_ids)
    torch.testing.assert_close(top.values, batch.topk_logprobs, atol=1e-5, rtol=0)
    assert batch.targets.shape[0] == sum(len(c) for c in labeled.slice(0, 5)["completion_token_ids"].to_pylist())
    smaller = sparse_batch(labeled.slice(0, 5), tokenizer.pad_token_id, k=3)
    expected_tail = batch.tail_mass + batch.topk_logprobs[:, 3:].exp().sum(-1)
    torch.testing.assert_close(smaller.tail_mass, expected_tail.clamp(0, 1), atol=1e-6, rtol=0)


def test_incompatible_inputs_fail_before_training(labeled):
    with pytest.raises(ValueError, match="k=50 is larger than the stored top-8"):
        check_compatible(labeled, 100, 50)
    with pytest.raises(ValueError, match=r"sample s0 stores token id \d+, beyond the student's vocabulary of 3: if the teacher"):
        check_compatible(labeled, 3, None)


@pytest.mark.parametrize("objective", ["sft", "supervised_kd"])
def test_a_short_run_lowers_the_loss(tiny_model_dir, labeled, objective):
    model, tokenizer = load_model(str(tiny_model_dir))
    config = TrainingSettings(objective=objective, steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=2)
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled), config)
    first, last = sum(c["loss"] for c in curve[:5]) / 5, sum(c["loss"] for c in curve[-5:]) / 5
    assert last < 0.8 * first


def test_accumulation_and_checkpointing_leave_the_step_unchanged(tiny_model_dir, labeled):
    """One global batch of 8 in micro-batches of 3 (3 + 3 + 2 sequences, unequal token counts) takes the
    step that one batch of 8 takes, because every micro-batch is divided by the global batch's tokens;
    gradient checkpointing recomputes the same activations."""
    results = []
    for options in [{}, {"micro_batch_size": 3}, {"gradient_checkpointing": True}]:
        model, tokenizer = load_model(str(tiny_model_dir))
        config = TrainingSettings(steps=2, batch_size=8, learning_rate=1e-2, warmup_steps=0,
                               nll_weight=1.0, **options)  # the KD path with an NLL term: a loss far from 0
        curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled), config)
        results.append(([c["loss"] for c in curve], [c["nll"] for c in curve], model.lm_head.weight.detach().clone()))
    (losses, nlls, weights), *others = results
    for other_losses, other_nlls, other_weights in others:
        assert other_losses == pytest.approx(losses, rel=1e-5) and other_nlls == pytest.approx(nlls, rel=1e-5)
        torch.testing.assert_close(other_weights, weights, atol=1e-5, rtol=1e-4)


def test_on_policy_batches_take_the_on_policy_divergence(tiny_model_dir, labeled):
    """DistiLLM-2's split: with on_policy_divergence, a fully on-policy training follows the curve of
    one with that divergence throughout, not of its fixed-data divergence."""
    curves = {}
    for name, losses in [("split", {"divergence": "skew_kl", "on_policy_divergence": "skew_reverse_kl"}),
                         ("reverse", {"divergence": "skew_reverse_kl"}), ("forward", {"divergence": "skew_kl"})]:
        model, tokenizer = load_model(str(tiny_model_dir))
        config = TrainingSettings(steps=3, batch_size=8, mix=1.0, rollouts=["-"], **losses)
        curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled, labeled), config)
        curves[name] = [c["loss"] for c in curve]
    assert curves["split"] == pytest.approx(curves["reverse"], rel=1e-6) and curves["split"] != pytest.approx(curves["forward"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cuda_without_a_gpu_fails_before_training(tiny_model_dir, labeled):
    model, tokenizer = load_model(str(tiny_model_dir))
    config = TrainingSettings(steps=1, device="cuda")
    with pytest.raises(ValueError, match="torch sees no CUDA device here: set device 'auto' or 'cpu'"):
        train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled), config)


def test_a_non_finite_loss_stops_with_a_clear_error(tiny_model_dir, labeled):
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    config = TrainingSettings(steps=3, batch_size=8)
    with pytest.raises(FloatingPointError, match="No checkpoint was written"):
        train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled), config)


def test_fresh_on_policy_batches_are_sampled_from_the_current_student(tiny_model_dir, labeled):
    """GKD's online form: every on-policy step takes one new batch, sampled from the student as it is
    at that step (here the tiny model labels its own samples, standing in for the teacher, stored in
    q8: codec topk-q8-v1 trains beside the float32 fixed data)."""
    model, tokenizer = load_model(str(tiny_model_dir))
    sampled_from = []

    def fresh_batch(i: int) -> pa.Table:
        sampled_from.append(model.lm_head.weight.detach().clone())
        prompts = [p.prompt for p in problems("train", 8, 1000 + i)]
        sampling = Sampling(temperature=1.0, max_new_tokens=16, seed=i)
        table = label(HFEngine(model, tokenizer, batch_size=8), pa.table({"prompt": prompts}), sampling, k=8, logprob_dtype="q8").table
        assert set(table["codec"].to_pylist()) == {Q8_CODEC} and set(pc.list_flatten(pc.list_flatten(table["topk_logprobs"])).to_pylist()
                                                                      ) <= {x / 16 for x in range(-255, 1)}
        return table.append_column("sample_id", pa.array([f"fresh{i}-{j}" for j in range(table.num_rows)]))

    config = TrainingSettings(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=1, mix=0.5)
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled, fresh_batch), config)
    sources = [c["source"] for c in curve]
    assert sources.count("on_policy") == len(sampled_from) and 0 < len(sampled_from) < 12
    assert all(not torch.equal(a, b) for a, b in zip(sampled_from, sampled_from[1:])), "a batch came from stale weights"

    def hotter_batch(step: int) -> pa.Table:
        table = labeled.slice(0, 8)
        return table.set_column(table.schema.get_field_index("temperature"), "temperature", pa.array([2.0] * 8, table["temperature"].type))

    with pytest.raises(ValueError, match="on-policy rows store the teacher at temperature 2.0, the fixed data at 1.0"):
        hot = TrainingSettings(steps=3, batch_size=8, mix=1.0)
        train_student(model, tokenizer, batches_for(model, tokenizer, hot, labeled, hotter_batch), hot)


def tiny_online_rollouts(model, tokenizer, tiny_model_dir, directory, prompts: int, seed: int, k: int, max_new_tokens: int):
    """(OnlineRollouts, its settings): `model` samples n = 2 per arithmetic prompt, the tiny model scores (its own teacher)."""
    arithmetic = problems("train", prompts, seed)
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(prompts)], "prompt": [p.prompt for p in arithmetic],
                             "answer": [str(p.answer) for p in arithmetic]}), directory / "prompts.parquet")
    settings = OnlineSettings(prompts=str(directory / "prompts.parquet"), batches=str(directory / "batches"), teacher=str(tiny_model_dir),
                              teacher_card=model_card("teacher", model, tokenizer), task="arithmetic", k=k,
                              sampling=Sampling(n=2, temperature=1.0, max_new_tokens=max_new_tokens),
                              identity={"student": "student", "student_weights_hash": "s"})
    return OnlineRollouts(model, tokenizer, settings.teacher_engine("cpu"), settings, batch_size=8), settings


def test_online_rollouts_append_each_on_policy_batch_with_its_policy_step(tiny_model_dir, labeled, tmp_path):
    """OnlineRollouts (the tiny model is its own teacher): every on-policy step writes the batch it
    trains on, sampled at that step (staleness 0); a resumed training forgets the batches from its step on."""
    model, tokenizer = load_model(str(tiny_model_dir))
    online, settings = tiny_online_rollouts(model, tokenizer, tiny_model_dir, tmp_path, prompts=6, seed=7, k=8, max_new_tokens=16)
    config = TrainingSettings(steps=8, batch_size=8, learning_rate=3e-3, warmup_steps=1, mix=0.5)
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled, online), config)
    on_policy = [c["step"] for c in curve if c["source"] == "on_policy"]
    assert 1 < len(on_policy) < 8 and all(c["staleness"] == 0 for c in curve if c["source"] == "on_policy")
    written = sorted((tmp_path / "batches").glob("step-*.parquet"))
    assert [p.name for p in written] == [f"step-{step:06d}.parquet" for step in on_policy]
    for step, path in zip(on_policy, written):
        batch = pq.read_table(path)
        assert batch.num_rows == 8 and set(batch["policy_step"].to_pylist()) == set(batch["trained_at_step"].to_pylist()) == {step}
        assert {"topk_ids", "student_token_logprob", "log_ratio_sum", "reward"} <= set(batch.column_names)
    online.forget_from(on_policy[1])
    assert sorted((tmp_path / "batches").glob("step-*.parquet")) == written[:1]

    pipelined = settings.model_copy(update={"pipelined": True, "batches": str(tmp_path / "pipelined")})
    config = config.model_copy(update={"mix": 1.0, "steps": 4})
    sampler = OnlineRollouts(model, tokenizer, online.teacher, pipelined, 8)
    curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled, sampler), config)
    assert [c["staleness"] for c in curve] == [0, 1, 1, 1]  # the first batch is sampled at once, each later one a step ahead
    batches = [pq.read_table(path) for path in sorted((tmp_path / "pipelined").glob("step-*.parquet"))]
    assert [(b["policy_step"][0].as_py(), b["trained_at_step"][0].as_py(), b["staleness"][0].as_py()) for b in batches] == [
        (0, 0, 0), (0, 1, 1), (1, 2, 1), (2, 3, 1)]
    with pytest.raises(ValueError, match="online sampling runs in one training process"):
        DistillCommand(student="", data=[], output="", mix=1.0, online=settings, launch={"processes": 2, "launcher": "torchrun"})


def test_policy_gradient_objectives_train_on_the_students_own_samples(tiny_model_dir, labeled, tmp_path):
    """Online (the tiny model is its own teacher, n = 2 per prompt): every batch carries each
    sample's reward, its prompt's mean reward as baseline and the advantage; kl_advantage and gkd_rl
    train on them, logging the policy gradient, clip fraction (0: fresh samples), entropy and KL to
    the sampler. Rewards that cannot work are refused before training."""
    model, tokenizer = load_model(str(tiny_model_dir))
    online, settings = tiny_online_rollouts(model, tokenizer, tiny_model_dir, tmp_path, prompts=8, seed=11, k=4, max_new_tokens=12)
    for objective in ("kl_advantage", "gkd_rl"):
        config = TrainingSettings(steps=2, batch_size=8, warmup_steps=0, mix=1.0, objective=objective, reward_weight=1.0)
        curve = train_student(model, tokenizer, batches_for(model, tokenizer, config, labeled, online), config)
        assert all(c["clip_fraction"] == 0 and c["kl_to_sampler"] < 1e-3 and c["entropy"] > 0 for c in curve)
        assert ("divergence" in curve[0]) == (objective == "gkd_rl")
    batch = pq.read_table(sorted((tmp_path / "batches").glob("step-*.parquet"))[0])
    groups = batch.group_by("prompt_id").aggregate([("reward", "mean"), ("prompt_id", "count")]).to_pylist()
    assert {g["prompt_id_count"] for g in groups} == {2}
    means = {g["prompt_id"]: g["reward_mean"] for g in groups}
    for row in batch.select(["prompt_id", "reward", "baseline", "advantage"]).to_pylist():
        assert row["baseline"] == means[row["prompt_id"]] and row["advantage"] == row["reward"] - row["baseline"]

    single = settings.model_copy(update={"sampling": Sampling(n=1, temperature=1.0, max_new_tokens=12)})
    with pytest.raises(ValueError, match=r"n ≥ 2 samples per prompt \(n is 1\)"):
        DistillCommand(student="", data=[], output="", mix=1.0, objective="gkd_rl", reward_weight=1.0, online=single)
    scored = own_samples(labeled)
    for name, rows in [("unanswered", scored.set_column(scored.schema.get_field_index("reward"), "reward",
                                                       pa.nulls(scored.num_rows, pa.float64()))),
                       ("alone", scored.set_column(scored.schema.get_field_index("prompt_id"), "prompt_id",
                                                   pa.array([f"q{i}" for i in range(scored.num_rows)])))]:
        pq.write_table(rows, tmp_path / f"{name}.parquet")
    with pytest.raises(ValueError, match="these samples have none"):
        DistillCommand(student="", data=[], output="", mix=1.0, objective="kl_advantage", reward_weight=0.5,
                       rollouts=[str(tmp_path / "unanswered.parquet")])
    pq.write_table(scored.drop_columns(["baseline", "advantage"]), tmp_path / "older.parquet")
    with pytest.raises(ValueError, match="no `advantage` column"):
        DistillCommand(student="", data=[], output="", mix=1.0, objective="gkd_rl", reward_weight=1.0,
                       rollouts=[str(tmp_path / "older.parquet")])
    with pytest.raises(ValueError, match="every prompt has one sample"):
        DistillCommand(student="", data=[], output="", mix=1.0, objective="gkd_rl", reward_weight=1.0,
                       rollouts=[str(tmp_path / "alone.parquet")])
    with pytest.raises(ValueError, match="objective 'supervised_kd' has none: use objective gkd_rl or kl_advantage"):
        TrainingSettings(reward_weight=1.0)


def test_rejection_sampling_keeps_what_the_verifier_or_the_judges_accepted(labeled, tmp_path):
    scored = own_samples(labeled)  # every third sample is right
    pq.write_table(scored, tmp_path / "scored.parquet")
    kept, total = accepted_samples([tmp_path / "scored.parquet"], 1.0, tmp_path / "kept.parquet")
    assert (kept, total) == (16, 48) and set(pq.read_table(tmp_path / "kept.parquet")["reward"].to_pylist()) == {1.0}
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ValueError, match="none of the round's 48 samples has reward ≥ 2.0: sample more"):
        accepted_samples([tmp_path / "scored.parquet"], 2.0, tmp_path / "none.parquet")
    pq.write_table(scored.drop_columns(["reward"]).append_column("reward", pa.nulls(48, pa.float64())), tmp_path / "free.parquet")
    with pytest.raises(ValueError, match="these have no reward .*: keep 'judged' \\(round_judgments\\), or 'all'"):
        accepted_samples([tmp_path / "free.parquet"], 1.0, tmp_path / "none.parquet")
    assert not (tmp_path / "none.parquet").exists()

    # kept by the judges' score instead (round_judgments: one row per candidate; corrections are candidates of their own)
    scores = [0.9 if i % 4 == 0 else 0.1 for i in range(48)]
    judgments = pa.table({"sample_id": scored["sample_id"].to_pylist() + ["a-correction"], "score": scores + [1.0],
                          "origin": ["student"] * 48 + ["correction"]})
    pq.write_table(judgments, tmp_path / "judgments.parquet")
    kept, total = accepted_samples([tmp_path / "free.parquet"], 0.5, tmp_path / "judged.parquet", [tmp_path / "judgments.parquet"])
    judged = pq.read_table(tmp_path / "judged.parquet")
    assert (kept, total) == (12, 48) and judged.column_names == pq.read_schema(tmp_path / "free.parquet").names
    assert judged["sample_id"].to_pylist() == [f"s{i}" for i in range(0, 48, 4)]
    with pytest.raises(ValueError, match="has judged score ≥ 2.0: .* lower min_score"):
        accepted_samples([tmp_path / "free.parquet"], 2.0, tmp_path / "none.parquet", [tmp_path / "judgments.parquet"])


def own_samples(labeled: pa.Table) -> pa.Table:
    """`labeled` as if the student had sampled it, two samples per prompt: with the logprob each token
    was sampled with (the teacher's, shifted) and a reward, baseline and advantage per sample."""
    reward = pa.array([float(i % 3 == 0) for i in range(labeled.num_rows)])
    prompt_ids = pa.array([f"p{i // 2}" for i in range(labeled.num_rows)])
    sampled = pc.add(pc.list_flatten(labeled["token_logprob"]), 0.1).combine_chunks()
    table = labeled.append_column("prompt_id", prompt_ids).append_column("reward", reward)
    table = table.append_column(STUDENT_LOGPROB, pa.ListArray.from_arrays(labeled["token_logprob"].combine_chunks().offsets, sampled))
    baseline = group_baselines(prompt_ids, reward)
    return table.append_column("baseline", baseline).append_column("advantage", pc.subtract(reward, baseline))


def test_two_processes_killed_and_resumed_follow_the_curve_of_one(tiny_model_dir, labeled, tmp_path):
    """`torchrun --nproc-per-node 2 -m training.launch` (DDP on gloo, two CPU processes, micro-batches
    of unequal counts) with checkpoint_every, killed with kill -9 after a checkpoint and launched
    again, resumes from it and ends on the loss curve of one uninterrupted process with the same
    global batch; rank 0 writes the whole model. The data streams from two files in windows of 16
    of its 48 rows, so the resumed position is mid-stream; half the batches are stored samples of
    the student (GKD with RL: the divergence and the reward's policy gradient on them)."""
    data = [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    pq.write_table(labeled.slice(0, 24), data[0], row_group_size=8)
    pq.write_table(labeled.slice(24), data[1], row_group_size=8)
    rollouts = [str(tmp_path / "rollouts.parquet")]
    pq.write_table(own_samples(labeled), rollouts[0], row_group_size=8)
    settings = dict(student=str(tiny_model_dir), data=data, rollouts=rollouts, mix=0.5, objective="gkd_rl", reward_weight=1.0,
                    steps=24, batch_size=7, micro_batch_size=2, shuffle_window=16, learning_rate=3e-3, warmup_steps=2, nll_weight=1.0)
    model, tokenizer = load_model(str(tiny_model_dir))
    alone = TrainingSettings(**settings)
    one = train_student(model, tokenizer, batches_for(model, tokenizer, alone, data, rollouts), alone)
    assert 0 < sum(c["source"] == "on_policy" for c in one) < 24
    assert all(("policy_gradient" in c) == (c["source"] == "on_policy") for c in one)

    output = tmp_path / "student"
    config = DistillCommand(**settings, output=str(output), checkpoint_every=6, launch={"launcher": "torchrun", "processes": 2})
    (tmp_path / "run.json").write_text(config.model_dump_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.launch", "--config", str(tmp_path / "run.json")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    latest = tmp_path / "student.state" / "latest.json"
    training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, start_new_session=True)
    while not (latest.exists() and json.loads(latest.read_text())["step"] >= 11):
        assert training.poll() is None, "the training ended before it could be killed"
        time.sleep(0.01)
    os.killpg(training.pid, signal.SIGKILL)  # torchrun and both ranks
    training.wait()
    killed_after = json.loads(latest.read_text())["step"]
    assert 11 <= killed_after < 23 and not (output / "curve.json").exists()

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment, timeout=180)
    resumed = json.loads((output / "curve.json").read_text())
    assert [c["step"] for c in resumed] == list(range(24))
    assert [c["completion_tokens"] for c in resumed] == [c["completion_tokens"] for c in one]
    assert [c["loss"] for c in resumed] == pytest.approx([c["loss"] for c in one], rel=1e-4)
    assert not (tmp_path / "student.state").exists()  # trained: the resumable state is removed
    trained, _ = load_model(str(output))  # written once, by rank 0, whole
    torch.testing.assert_close(trained.state_dict(), model.state_dict(), rtol=1e-3, atol=1e-5)


def test_processes_need_a_launcher():
    with pytest.raises(ValueError, match="processes=2 needs a launcher"):
        LaunchSettings(processes=2)


def test_lora_trains_only_the_adapter_and_saves_it_merged(tiny_model_dir, labeled, tmp_path):
    """`lora`: the command trains low-rank adapters only; it writes the adapter, and the merged
    student, whose outputs are the adapted model's, while the frozen weights stay where they were.
    One batch of 8 sequences, drawn again every step: the adapter learns it."""
    pq.write_table(labeled.slice(0, 8), tmp_path / "data.parquet")
    config = DistillCommand(student=str(tiny_model_dir), data=[str(tmp_path / "data.parquet")], output=str(tmp_path / "student"),
                            steps=20, batch_size=8, learning_rate=5e-2, warmup_steps=0, nll_weight=1.0,
                            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    losses = [c["loss"] for c in run(config, printed())]
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.2
    from peft import PeftModel

    base, _ = load_model(str(tiny_model_dir))
    adapted = PeftModel.from_pretrained(load_model(str(tiny_model_dir))[0], str(tmp_path / "student" / "adapter")).eval()
    merged, _ = load_model(str(tmp_path / "student"))
    changed = {name for name, value in merged.state_dict().items() if not torch.equal(value, base.state_dict()[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    ids = torch.tensor([labeled["prompt_token_ids"][0].as_py() + labeled["completion_token_ids"][0].as_py()])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
