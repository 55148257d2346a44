"""The GKD ordering on the embedded task: exact-match gain over the same start (`student_model`, or
with --start offline_student the distilled student, as GKD starts from supervised fine-tuned students).

    .venv/bin/python bench/quality.py [--seeds 3] [--tokens 240000] [--eval-problems 500] [--start student]
    DISTILL_HOME=.distill-chain .venv/bin/python bench/quality.py --task arithmetic_chain --tokens 960000

Needs the demo's teacher, student and teacher_labeled (`make demo`); with --task arithmetic_chain (four
dependent operations, 193 tokens of steps on average, where one wrong step derails the rest) it builds
them first, when DISTILL_HOME has none, with the graph's own assets and LONG_TASK's settings. Arms, each with the same number
of training tokens (steps are set from the mean completion length of what each step draws):
  sft_ground_truth   SFT on the task's reference solutions
  seqkd              SFT on the teacher's greedy outputs (teacher_labeled)
  λ=0 / 0.5 / 1      supervised KD (fixed data only), mixed, on-policy, each with forward KL,
                     reverse KL and JSD(0.5) on the stored top-k signal
  stored λ=0.5 / 1   JSD(0.5), the on-policy batches drawn from rollouts sampled once from the start
                     (a stored round's defaults: 768 prompts × 2), so they grow stale as training goes
  distillm-2 λ=0.5   DistiLLM-2's split: skew KL (α = 0.1) on the teacher's data, skew reverse KL on
                     the student's fresh samples (`on_policy_divergence`)
  dpo verifier pairs    DPO (β = 0.1) on best-vs-worst pairs of the start's own samples, judged by the verifier
                        with the teacher's likelihood as tie-break (the default judgment weights)
  dpo likelihood pairs  the same pairs judged by the teacher's likelihood alone
  corrections sft       SFT on the teacher's corrections of the start's wrong samples (those the verifier accepts)
  gkd + dpo             DPO on the verifier pairs + kd_weight · JSD(0.5) to the teacher's signal on both responses
                        (at --learning-rate, the KD arms'; the DPO arms train at PREFERENCE_LR)
  on_policy λ=1 n=2     on-policy JSD(0.5) on n = 2 fresh samples of half as many prompts: gkd + rl's batches
  gkd + rl λ=1          objective gkd_rl: JSD(0.5) + the verifier reward's policy gradient (REWARD_WEIGHT,
                        baseline: the mean reward of the prompt's n = 2 fresh samples)
  kl advantage λ=1      objective kl_advantage: the policy gradient of log p_T(y_t) − log q(y_t) per sampled
                        token, the teacher storing k = 0 (its logprob of each sampled token only), at KL_ADVANTAGE_LR
  kl advantage + reward the same plus the verifier reward's advantage (REWARD_WEIGHT, n = 2)
  rejection sampling    self-distillation: SFT on the start's own samples (the feedback arms' n = 4 per prompt)
                        that the verifier accepted; no teacher
The feedback arms' data is built once per seed from the start (training/feedback/): n = 4 samples (T = 1)
on --feedback-prompts train prompts, scored and judged by the teacher, best-vs-worst pairs of each prompt's
distinct responses with the start's reference log-probs. A pair's tokens are both its responses'; data
smaller than --tokens is cycled (reshuffled each pass).
On-policy batches of the λ arms follow GKD's Algorithm 1, as an online round does (training/rounds/online.py):
each one is sampled from the student as it is at that step (T = 1, no gradient) on fresh train prompts
and scored by the teacher, so no sample is seen twice. Every arm is one run of `train_student` (one
optimizer, one lr schedule).
Prints a markdown table of greedy / sampled exact-match gain (mean ± std over seeds) and writes a PNG.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from teacher import corrected_prefix_exact_match, distribution_figures

from pipelines.definitions import defs
from pipelines.instance import prepare_dagster_home
from storage.store import Store
from training.data.labeling import sample, score, with_columns
from training.data.rollouts import feedback_table, sample_rollouts
from training.engines.hf import HFEngine
from training.engines.sampling import Sampling
from training.evals.evaluate import evaluate
from training.feedback.judgments import JudgmentSettings, judgments_table
from training.feedback.pairs import PairPolicy, preference_pairs, with_reference_logprobs
from training.models.chat import prompt_ids_for
from training.models.checkpoints import load_model, model_card, weights_hash
from training.rounds.online import OnlineRollouts, OnlineSettings
from training.schema.signal import SignalSettings
from training.tasks import get_task
from training.tasks.arithmetic import parse_worked
from training.trainer.loop import train_student
from training.trainer.settings import TrainingSettings
from training.trainer.sources import batches_for

K = 20
SIGNAL_COLUMNS = {"topk_ids", "topk_logprobs", "token_logprob", "tail_mass"}  # the teacher's stored signal, for its bytes per token
BATCH = 32
DIVERGENCES = {"forward_kl": ("forward_kl", 0.5), "reverse_kl": ("reverse_kl", 0.5), "jsd(0.5)": ("jsd", 0.5),
               "skew_kl": ("skew_kl", 0.5)}
TASK = get_task("arithmetic")  # or --task's
LONG_TASK = {  # the run config of the store --task arithmetic_chain builds: the graph's assets, settings only
    "seed_prompts": {"task": "arithmetic_chain"},
    "teacher_model": {"task": "arithmetic_chain", "train_steps": 1200, "instruction_share": 0.0},
    "student_model": {"task": "arithmetic_chain", "hidden_size": 96, "train_steps": 700},
    "teacher_labeled": {"sampling": {"max_new_tokens": 288}},
}
PREFERENCE_LR = 1e-5  # the DPO arms' (SFT and KD: --learning-rate); from offline_student, 2e-5 already lost 0.04 and 2e-4 0.49 (seed 0)
KD_WEIGHT = 100.0  # gkd + dpo, at the KD arms' 1e-3: the per-token JSD(0.5) is ~1e-2, the per-pair DPO loss ~0.7 (seed 0: 10 lost)
REWARD_WEIGHT = 0.1  # gkd + rl (seed 0, n = 2): 1 gained +0.031, 0.1 +0.070, 0.01 +0.092, none +0.084: the per-token JSD is ~1e-2
KL_ADVANTAGE_LR = 3e-5  # kl advantage (seed 0): 1e-3 lost 0.185, 3e-4 lost 0.028, 1e-4 gained +0.006, 3e-5 +0.022
PAIR_JUDGES = {"verifier_pairs": ["verifier", "likelihood"], "likelihood_pairs": ["likelihood"]}


def arms() -> list[dict]:
    out = [{"arm": "sft_ground_truth", "objective": "sft", "data": "ground_truth", "mix": 0.0, "divergence": "-"},
           {"arm": "seqkd", "objective": "sft", "data": "teacher_labeled", "mix": 0.0, "divergence": "-"}]
    for mix, name in [(0.0, "supervised_kd"), (0.5, "mixed"), (1.0, "on_policy")]:
        for label in DIVERGENCES:
            out.append({"arm": f"{name} λ={mix}", "objective": "supervised_kd", "data": "teacher_labeled", "mix": mix, "divergence": label})
    for mix in (0.5, 1.0):
        out.append({"arm": f"stored λ={mix}", "objective": "supervised_kd", "data": "teacher_labeled", "mix": mix,
                    "divergence": "jsd(0.5)", "stored": True})
    out.append({"arm": "distillm-2 λ=0.5", "objective": "supervised_kd", "data": "teacher_labeled", "mix": 0.5,
                "divergence": "skew_kl", "on_policy_divergence": "skew_reverse_kl"})  # α = 0.1 both ways
    dpo = {"objective": "dpo", "mix": 0.0, "divergence": "-", "learning_rate": PREFERENCE_LR}
    out += [{**dpo, "arm": "dpo verifier pairs", "data": "verifier_pairs"},
            {**dpo, "arm": "dpo likelihood pairs", "data": "likelihood_pairs"},
            {"arm": "corrections sft", "objective": "sft", "data": "corrections", "mix": 0.0, "divergence": "-"},
            {**dpo, "arm": "gkd + dpo", "data": "verifier_pairs", "divergence": "jsd(0.5)", "kd_weight": KD_WEIGHT, "learning_rate": None}]
    policy = {"data": "teacher_labeled", "mix": 1.0, "divergence": "jsd(0.5)"}
    advantage = {**policy, "objective": "kl_advantage", "divergence": "-", "k": 0, "learning_rate": KL_ADVANTAGE_LR}
    out += [{**policy, "arm": "on_policy λ=1 n=2", "objective": "supervised_kd", "n": 2},  # gkd + rl's batches, without the reward
            {**policy, "arm": "gkd + rl λ=1", "objective": "gkd_rl", "reward_weight": REWARD_WEIGHT, "n": 2},
            {**advantage, "arm": "kl advantage λ=1"},
            {**advantage, "arm": "kl advantage + reward", "reward_weight": REWARD_WEIGHT, "n": 2},
            {"arm": "rejection sampling", "objective": "sft", "data": "accepted", "mix": 0.0, "divergence": "-"}]
    return out


def ground_truth_table(teacher: HFEngine, labeled: pa.Table) -> pa.Table:
    """The reference solutions of the labeled prompts, as token ids (scored by the teacher so that the
    table has the signal columns a batch needs; SFT only uses the tokens)."""
    parsed = [parse_worked(p) for p in labeled["prompt"].to_pylist()]
    solutions = [p.solution if p is not None else None for p in parsed]
    keep = [i for i, s in enumerate(solutions) if s is not None]
    tokenizer = teacher.tokenizer
    encoded = tokenizer([solutions[i] for i in keep], add_special_tokens=False)["input_ids"]
    completion_ids = [ids + [tokenizer.eos_token_id] for ids in encoded]
    table = pa.table({
        "sample_id": pa.array([f"gt{i}" for i in keep]),
        "prompt_token_ids": labeled["prompt_token_ids"].take(pa.array(keep)),
        "completion_token_ids": pa.array(completion_ids, pa.list_(pa.int32())),
    })
    signal, _ = score(teacher, table, K)
    return with_columns(table, signal).append_column("num_tokens", pc.list_value_length(table["completion_token_ids"]))


def own_samples(student, tokenizer, prompts: list[str], seed: int) -> pa.Table:
    """The student's own samples (T = 1) on `prompts`."""
    sampling = Sampling(temperature=1.0, max_new_tokens=TASK.completion_tokens, seed=seed)
    return sample(HFEngine(student, tokenizer, batch_size=128), pa.table({"prompt": prompts}), sampling)[0]


def train_prompts(n: int, seed: int) -> pa.Table:
    """n train problems as a prompt table (prompt_id, prompt, answer)."""
    return TASK.prompts("train", n, 1_000_000 * (seed + 1)).append_column("prompt_id", pa.array([f"q{seed}-{i}" for i in range(n)]))


def online_rollouts(student, tokenizer, teacher: HFEngine, seed: int, steps: int, directory: str,
                    pipelined: bool = False, n: int = 1, k: int = K) -> OnlineRollouts:
    """GKD's on-policy batches, as an online round draws them: each step samples the student as it is
    then (pipelined: one step earlier) n times on BATCH / n new train prompts, and the teacher scores
    them (top-k)."""
    pq.write_table(train_prompts(steps * BATCH, seed), f"{directory}/prompts.parquet")
    settings = OnlineSettings(prompts=f"{directory}/prompts.parquet", batches=f"{directory}/batches", teacher="-", k=k,
                              sampling=Sampling(n=n, temperature=1.0, max_new_tokens=TASK.completion_tokens, seed=seed),
                              teacher_card=model_card("teacher", teacher.model, teacher.tokenizer), task=TASK.name, pipelined=pipelined,
                              identity={"student": "start", "student_weights_hash": "-"})
    return OnlineRollouts(student, tokenizer, teacher, settings, BATCH)


def stored_rollouts(student, tokenizer, teacher: HFEngine, seed: int) -> pa.Table:
    """A stored round's rollouts: 768 prompts × 2 samples from the start, scored once by the teacher."""
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=TASK.completion_tokens, seed=seed)
    rollouts, _ = sample_rollouts(HFEngine(student, tokenizer, batch_size=128), train_prompts(768, seed), sampling,
                                  {"student": "start", "student_weights_hash": "-"})
    return feedback_table(teacher, None, rollouts, SignalSettings(k=K), model_card("teacher", teacher.model, teacher.tokenizer), TASK)[0]


def distinct_responses(samples: pa.Table) -> pa.Table:
    """The first of each prompt's identical samples: copies of one response would pair on float noise in
    their likelihood (a margin of ~1e-15), and the teacher would write the same correction for each."""
    numbered = samples.append_column("row", pa.array(range(samples.num_rows), pa.int64()))
    first = numbered.group_by(["prompt_id", "completion"]).aggregate([("row", "min")])["row_min"]
    return samples.take(pc.sort_indices(first))


def feedback_data(start: str, teacher: HFEngine, seed: int, needed: set[str], prompts: int) -> tuple[dict[str, pa.Table], dict]:
    """The feedback arms' tables named in `needed` (verifier_pairs, likelihood_pairs, corrections), built
    from the start's samples (`prompts` train prompts × 4, T = 1) scored by the teacher; and figures."""
    student, tokenizer = load_model(start)
    engine = HFEngine(student, tokenizer, batch_size=128)
    card = model_card("teacher", teacher.model, teacher.tokenizer)
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=TASK.completion_tokens, seed=seed)
    identity = {"student": "start", "student_weights_hash": "-"}
    rollouts, _ = sample_rollouts(engine, train_prompts(prompts, seed), sampling, identity)
    scored = feedback_table(teacher, None, rollouts, SignalSettings(k=K), card, TASK)[0]
    correct = scored.group_by("prompt_id").aggregate([("reward", "sum")])["reward_sum"]
    candidates = distinct_responses(scored)
    figures = {"samples": scored.num_rows, "wrong": pc.sum(pc.equal(scored["reward"], 0.0)).as_py(), "distinct": candidates.num_rows,
               "prompts_all_right": pc.sum(pc.equal(correct, 4.0)).as_py(), "prompts_all_wrong": pc.sum(pc.equal(correct, 0.0)).as_py()}
    judge = {"judge_model": "teacher", "judge_weights_hash": card.weights_hash}
    tables = {}
    for name in sorted(needed & set(PAIR_JUDGES)):
        judged = judgments_table(teacher, candidates, JudgmentSettings(k=K, judges=PAIR_JUDGES[name]), TASK, judge)[0]
        pairs, pair_figures = preference_pairs(judged, PairPolicy(strategy="best_vs_worst"))
        tables[name] = with_reference_logprobs(engine, pairs, weights_hash(student))
        chosen, rejected = (judged["reward"].take(pc.index_in(pairs[f"{side}_sample_id"], judged["sample_id"]))
                            for side in ("chosen", "rejected"))  # the verifier's verdicts, whoever judged the pair
        figures[name] = {"pairs": pairs.num_rows, "mean_margin": round(pair_figures["mean_margin"], 3),
                         "right_over_wrong": pc.sum(pc.greater(chosen, rejected)).as_py(),
                         "wrong_over_right": pc.sum(pc.less(chosen, rejected)).as_py()}
    if "accepted" in needed:  # rejection sampling: the start's own samples that the verifier accepts
        tables["accepted"] = scored.filter(pc.equal(scored["reward"], 1.0))
        figures["accepted"] = tables["accepted"].num_rows
    if "corrections" in needed:
        judged, judged_figures = judgments_table(teacher, candidates, JudgmentSettings(k=K, correct=True), TASK, judge)
        fixed = judged.filter(pc.and_(pc.equal(judged["origin"], "correction"), pc.equal(judged["verifier"], 1.0)))
        tables["corrections"] = fixed.select(["sample_id", "prompt_token_ids", "completion_token_ids", "num_tokens"])
        figures["corrections"] = {"written": judged_figures.get("corrections", 0), "verified": fixed.num_rows,
                                  "mean_cut": round(pc.mean(fixed["correction_cut"]).as_py() or 0.0, 1)}
    return tables, figures


def mean_tokens(table: pa.Table) -> float:
    """The completion tokens a row trains on, on average: a response's, or both of a pair's."""
    if "chosen_token_ids" in table.column_names:
        return pc.mean(pc.add(pc.list_value_length(table["chosen_token_ids"]), pc.list_value_length(table["rejected_token_ids"]))).as_py()
    return pc.mean(table["num_tokens"]).as_py()


def run_arm(arm: dict, seed: int, start: str, data: dict, teacher: HFEngine, args, eval_problems) -> dict:
    """Steps are set so that the expected completion tokens match args.tokens; on-policy batches are
    costed at the start student's mean sample length, and the table reports the tokens actually seen."""
    student, tokenizer = load_model(start)
    divergence, beta = DIVERGENCES.get(arm["divergence"], ("jsd", 0.5))
    fixed = data[arm["data"]] if arm["data"] in data else data["feedback"][seed][arm["data"]]
    per_step = BATCH * ((1 - arm["mix"]) * mean_tokens(fixed) + arm["mix"] * data["on_policy_tokens"])
    steps = max(1, round(args.tokens / per_step))
    config = TrainingSettings(
        objective=arm["objective"], divergence=divergence, beta=beta, kd_weight=arm.get("kd_weight", 0.0),
        reward_weight=arm.get("reward_weight", 0.0), temperature=args.temperature,
        steps=steps, batch_size=BATCH, learning_rate=arm.get("learning_rate") or args.learning_rate, warmup_steps=10,
        on_policy_divergence=arm.get("on_policy_divergence", "same"), seed=seed, mix=arm["mix"],
    )
    with tempfile.TemporaryDirectory() as directory:
        if arm["mix"] == 0:
            rollouts = None
        elif arm.get("stored"):
            rollouts = stored_rollouts(student, tokenizer, teacher, seed)
        else:
            rollouts = online_rollouts(student, tokenizer, teacher, seed, steps, directory, n=arm.get("n", 1), k=arm.get("k", K))
        curve = train_student(student, tokenizer, batches_for(student, tokenizer, config, fixed, rollouts), config)
        signal = signal_bytes_per_token(sorted(Path(directory).glob("batches/step-*.parquet")))
    results = evaluate(student, tokenizer, eval_problems, TASK, seed=seed)
    clipped = [c["clip_fraction"] for c in curve if "clip_fraction" in c]
    return {**results, "tokens": sum(c["completion_tokens"] for c in curve), "signal_bytes_per_token": signal,
            "clip_fraction": statistics.mean(clipped) if clipped else None}


def signal_bytes_per_token(paths: list[Path]) -> float | None:
    """The compressed Parquet bytes of the teacher's signal columns per scored token of the online batches."""
    tokens = sum(pc.sum(pq.read_table(path, columns=["num_tokens"])["num_tokens"]).as_py() or 0 for path in paths)
    stored = 0
    for path in paths:
        metadata = pq.read_metadata(path)
        stored += sum(metadata.row_group(g).column(c).total_compressed_size for g in range(metadata.num_row_groups)
                      for c in range(metadata.num_columns) if metadata.schema.column(c).path.split(".")[0] in SIGNAL_COLUMNS)
    return stored / tokens if tokens else None


def build_long_task_store(store: Store) -> None:
    """The teacher, student, seed prompts and teacher_labeled of the long task, materialized by the
    offline graph's own assets with LONG_TASK's run config, unless the store has them."""
    if store.root.joinpath("models", "teacher").exists():
        return
    prepare_dagster_home(os.environ.setdefault("DAGSTER_HOME", str(store.root / "dagster")))
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("distill_offline").execute_in_process(
            instance=instance, run_config={"ops": {name: {"config": config} for name, config in LONG_TASK.items()}},
            asset_selection=[dg.AssetKey(name) for name in LONG_TASK])
    if not result.success:
        raise SystemExit("building the long task's models and teacher_labeled failed; see the log above")


def main() -> None:
    global TASK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=240_000, help="completion tokens each arm trains on")
    parser.add_argument("--eval-problems", type=int, default=500)
    parser.add_argument("--start", default="student", help="the model card every arm starts from: student or offline_student")
    parser.add_argument("--arms", default="", help="comma-separated substrings of arm names to run (default: all)")
    parser.add_argument("--feedback-prompts", type=int, default=4096, help="train prompts × 4 samples of the start, per seed, "
                        "for the feedback arms")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="the SFT, KD and on-policy arms' peak learning rate "
                        "(the DPO and advantage arms keep theirs)")
    parser.add_argument("--temperature", type=float, default=1.0, help="the loss temperature τ, teacher and student alike "
                        "(the teacher's top-k renormalized at log p · 1/τ)")
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "arithmetic_chain"])
    parser.add_argument("--png", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    store, TASK = Store(), get_task(args.task)
    if args.task == "arithmetic_chain":
        build_long_task_store(store)
    try:
        start, teacher_card = store.read_card(args.start).path, store.read_card("teacher")
        labeled = store.read_dataset("teacher_labeled")
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nRun `make demo` first: the benchmark starts from its teacher, student and teacher_labeled.")
    teacher = HFEngine.load(teacher_card.path, batch_size=128)
    data = {"teacher_labeled": labeled, "ground_truth": ground_truth_table(teacher, labeled)}
    eval_problems = TASK.prompts("eval", args.eval_problems, 0)
    start_model, start_tokenizer = load_model(start)
    own = own_samples(start_model, start_tokenizer, TASK.prompts("train", 256, 999)["prompt"].to_pylist(), 999)
    data["on_policy_tokens"] = mean_tokens(own)
    on_own = distribution_figures(teacher, prompt_ids_for(teacher.tokenizer, own).to_pylist(), own["completion_token_ids"].to_pylist())
    baseline = evaluate(start_model, start_tokenizer, eval_problems, TASK, seed=0)
    recovered = corrected_prefix_exact_match(teacher, args.eval_problems, TASK)
    print(f"teacher: greedy {teacher_card.eval_exact_match:.3f}, continuing after a wrong step {recovered:.3f}", flush=True)
    print(f"start ({args.start}): greedy {baseline['greedy_exact_match']:.3f}  sampled {baseline['sampled_exact_match']:.3f}", flush=True)
    print("the teacher on the start's own samples (T = 1), per token: entropy {entropy:.4f} nats, 1 − p(argmax) {off_argmax:.4f}, "
          "sampled token not its argmax {not_argmax:.4f}".format(**on_own), flush=True)
    selected = [a for a in arms() if not args.arms or any(s in f"{a['arm']} {a['divergence']}" for s in args.arms.split(","))]
    rows, began = [], time.perf_counter()
    if needed := {a["data"] for a in selected} - set(data):
        data["feedback"] = {}
        for seed in range(args.seeds):
            data["feedback"][seed], figures = feedback_data(start, teacher, seed, needed, args.feedback_prompts)
            print(f"feedback data, seed {seed}: {figures}  ({time.perf_counter() - began:.0f} s)", flush=True)
    for arm in selected:
        runs = [run_arm(arm, seed, start, data, teacher, args, eval_problems) for seed in range(args.seeds)]
        greedy = [r["greedy_exact_match"] - baseline["greedy_exact_match"] for r in runs]
        sampled = [r["sampled_exact_match"] - baseline["sampled_exact_match"] for r in runs]
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append({**arm, "greedy": statistics.mean(greedy), "greedy_sd": spread(greedy), "sampled": statistics.mean(sampled),
                     "sampled_sd": spread(sampled), "tokens": round(statistics.mean(r["tokens"] for r in runs))})
        extra = {name: [r[name] for r in runs if r[name] is not None] for name in ("signal_bytes_per_token", "clip_fraction")}
        shown = "  ".join(f"{name} {statistics.mean(values):.3g}" for name, values in extra.items() if values)
        print(f"{arm['arm']:22s} {arm['divergence']:10s} greedy gain {rows[-1]['greedy']:+.3f} ± {rows[-1]['greedy_sd']:.3f}  "
              f"sampled gain {rows[-1]['sampled']:+.3f} ± {rows[-1]['sampled_sd']:.3f}  tokens {rows[-1]['tokens']:,}  {shown}  "
              f"({time.perf_counter() - began:.0f} s)",
              flush=True)
    print(f"\n{args.task}: {args.seeds} seed(s), {args.tokens:,} training tokens per arm, on-policy batches sampled fresh at every step, "
          f"{args.eval_problems} eval problems, learning rate {args.learning_rate:g}, loss temperature {args.temperature:g}; "
          f"start {args.start}, greedy {baseline['greedy_exact_match']:.3f}\n")
    print("| arm | divergence | training tokens | greedy EM gain | sampled EM gain |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['divergence']} | {r['tokens']:,} | {r['greedy']:+.3f} ± {r['greedy_sd']:.3f} "
              f"| {r['sampled']:+.3f} ± {r['sampled_sd']:.3f} |")
    figure, axis = plt.subplots(figsize=(9, 4))
    labels = [f"{r['arm']}\n{r['divergence']}" for r in rows]
    axis.bar(range(len(rows)), [r["greedy"] for r in rows], yerr=[r["greedy_sd"] for r in rows], capsize=3)
    axis.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    axis.set(ylabel="greedy exact-match gain over start", title=f"GKD ordering on {args.task}")
    figure.tight_layout()
    png = args.png or f"bench/quality{'' if args.task == 'arithmetic' else '_' + args.task}.png"
    figure.savefig(png)
    print(f"\nplot: {Path(png).resolve()}  ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
