"""Evaluation of causal language models on the `facts` task (TOFU / MUSE metrics), run by every worker of a group.

What is reported (definitions in lm_metrics.py and METHODS.md, "Language models"):

- `forget_prob`, `retain_prob`: mean answer probability p(a|q)^(1/|a|) on the forget side (the whole target: every
  training QA row of the forgotten entities or category) and on the retain side (training rows outside the target).
- `held_out_prob`: the same on the held-out rows (never-trained entities), from the forward pass the attack needs
  anyway: about what a retrained model's forget_prob comes to, a retrain-free target for the forget side.
- `forget_ROUGE`, `retain_ROUGE`, `held_out_ROUGE`: mean ROUGE-L recall of the greedy answer against the reference
  answer (held-out: people never trained, how well retrain answers the forget people).
- `forget_truth_ratio`: mean over the forget questions of the truth ratio (perturbed answers over the paraphrased
  one, geometric mean over the perturbed answers as lm_metrics.truth_ratio): below 1 while the model still prefers
  the true answer, about 1 once it cannot tell. (open-unlearning's forget "Truth Ratio" row aggregates the same
  per-question ratios as mean(min(r, 1/r)) instead; the per-question ratios, which forget quality reads, are the same.)
  Measured on facts: a model fit to the bare answers ("Porto") scores ratios well above 1, because the paraphrase
  is worded ("the city of Porto") and the perturbed answers are bare ("Oslo"), so the ratio there also compares
  wordings; TOFU words its perturbed answers like the paraphrase. Hence model_utility's truth-ratio term is near 0.
- `model_utility`: lm_metrics.model_utility of the retain side (harmonic mean of retain probability, ROUGE and
  mean max(0, 1 − truth ratio)).
- `mia_auc`: ROC AUC of the Min-K% Prob attack (k = 40%) telling the forget rows (members) from the held-out rows
  (never-trained entities: `splits.test`, or the validation rows under `Splits.for_tuning`).

Against the reference (retrain), `compare` adds `forget_quality` (KS-test p-value of the forget truth ratios under
the model vs under retrain: 1.0 for retrain itself) and `privleak` (MUSE's PrivLeak in percent from the two AUCs:
0 for retrain itself, negative for an under-unlearned model such as the original). The job compares every run, the
original included, so every row of the table has both.

The retain side is capped: a seeded subset of at most `max_retain` rows (default 400, drawn once on the driver from
the job's seed) is evaluated, so a large retain set (TOFU's retain90 is 3,600 questions) costs no more than a few
forget sets. The forget and held-out sides are evaluated whole.

How it runs. Built once on the driver from the splits (row ids) and the corpus texts, it pickles as plain lists of
strings; the tokenizer is loaded on the worker on first use (`dataset_tokenizer`) and never pickled. Every worker
of a group calls `evaluate(model, comm, device)` with the module as handed: a plain model, the module under DDP, a
peft model, or an FSDP2-sharded model whose every forward is a collective. So every rank runs the same number of
forward passes: teacher-forced scoring pads a rank's shorter list of batches with one-row filler forwards, and
greedy decoding goes through `lm_sharding.synced_greedy`, which keeps ranks with uneven prompt counts in lockstep.

Shares. Each side is cut into chunks of `batch_size` rows in row order, and each rank takes one contiguous run of
whole chunks (`shards.eval_share` over chunk ids: chunk counts differ by at most one). Every row is thus scored
in the same batch (same rows, same padding) whatever the worker count, so 1 and N workers give the same numbers
bit for bit for the teacher-forced scores; and the number of forward passes per rank, ceil(n / (world x batch)),
is what row-balanced shares would cost under lockstep anyway. Greedy batches are padded by synced_greedy to the
largest rank's prompt count and length, so there the numbers agree up to float rounding (an arg-max flip needs a
near tie). Per-row results are all-gathered in rank order, i.e. in row order.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import ks_2samp
from torch import nn

from unlearn.comm import Comm, LocalComm
from unlearn.data.scenarios import Splits
from unlearn.evaluation import lm_metrics as lm
from unlearn.shards import eval_share
from unlearn.spec import JobSpec

MAX_RETAIN = 400  # retain rows evaluated at most (a seeded subset): model utility stays cheap on big retain sets
SAMPLE_ANSWERS = 20  # forget rows whose greedy answers go to the run's CSV artifact (the first ones in row order)
EXTRA_NEW_TOKENS = 2  # greedy answers may run this many tokens past the longest reference answer (and its <eos>)
SIDES = ("forget", "retain", "held_out")
# the metrics `compare`'s gap measures the distance to the reference on (fractions in [0, 1])
GAP_TERMS = ("forget_prob", "forget_ROUGE", "retain_prob", "retain_ROUGE", "mia_auc")
# per-row columns gathered across ranks (NaN where a side does not compute one)
PROB, MIN_K, TRUTH, ROUGE = range(4)


@dataclass
class SideTexts:
    """The strings of one evaluated side, in row order (plain lists: cheap to pickle)."""

    question: list[str]
    answer: list[str]
    paraphrase: list[str]
    perturbed: list[list[str]]

    def __len__(self) -> int:
        return len(self.question)


@dataclass
class LMOutputs:
    """What `compare` and `artifacts` need of one model's evaluation (small, picklable)."""

    forget_truth_ratio: np.ndarray  # per forget row, in row order
    forget_min_k: np.ndarray  # Min-K% Prob per forget row (members)
    held_out_min_k: np.ndarray  # Min-K% Prob per held-out row (non-members)
    # (question, reference answer, greedy answer, ROUGE-L recall) of the first SAMPLE_ANSWERS forget rows
    answers: list[tuple[str, str, str, float]] = field(default_factory=list)


def retain_subset(n: int, cap: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the retain rows evaluated: all when there are at most `cap`, else a seeded draw."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 4049).choice(n, size=cap, replace=False))


class LanguageModellingEvaluator:
    """TOFU / MUSE metrics of a causal LM on a job's facts splits, computed on the workers' shares (module docstring).

    Built on the driver from `(splits, spec, dataset)`: the corpus texts of the forget (target), retain (capped)
    and held-out (test) rows are looked up here; `dataset` (the row store) is not needed beyond the splits.
    """

    def __init__(self, splits: Splits, spec: JobSpec, dataset: Any = None, *, max_retain: int = MAX_RETAIN,
                 batch_size: int = lm.EVAL_BATCH, sample_answers: int = SAMPLE_ANSWERS) -> None:
        from unlearn.data.facts_rows import corpus_of, texts

        if max_retain < 1 or batch_size < 1:
            raise ValueError("max_retain and batch_size must be at least 1")
        self.dataset_spec, self.seed, self.cache_dir = spec.dataset, spec.seed, str(spec.cache_dir)
        self.name = spec.name
        self.batch_size, self.sample_answers = batch_size, sample_answers
        self.out_dir: Path | None = None  # set by the job: the answers CSV is also written next to results.json
        parts = texts(corpus_of(spec.dataset, spec.seed, spec.cache_dir))
        retain_pos = retain_subset(len(splits.retain.index), max_retain, spec.seed)
        chosen = {"forget": ("train", splits.target), "retain": ("train", splits.retain),
                  "held_out": ("test", splits.test)}
        self.sides: dict[str, SideTexts] = {}
        for side, (part, split) in chosen.items():
            rows = np.asarray(split.index, dtype=np.int64)
            labels = np.asarray(split.y)
            if side == "retain":
                rows, labels = rows[retain_pos], labels[retain_pos]
            t = parts[part].take(rows)
            if splits.label_level == "class" and not np.array_equal(t.entity, labels):
                raise ValueError(f"language_modelling evaluator: the corpus texts of the {side} rows are not the "
                                 "rows the splits hold (a corpus or tokenizer other than the dataset's?)")
            self.sides[side] = SideTexts(list(t.question), list(t.answer), list(t.paraphrase),
                                         [list(p) for p in t.perturbed])
        self._tokenizer: Any = None
        self._new_tokens: int | None = None  # greedy decoding's step count (`_max_new_tokens`)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # loaded again where it is used (a pretrained model's tokenizer is megabytes)
        return state

    def tokenizer(self) -> Any:
        """The transformers tokenizer the rows were encoded with (loaded once per process)."""
        if self._tokenizer is None:
            from unlearn.data.facts_rows import dataset_tokenizer

            self._tokenizer = dataset_tokenizer(self.dataset_spec, self.seed, self.cache_dir)
        return self._tokenizer

    # --- evaluation on the workers --------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, comm: Comm | None = None,
                 device: torch.device | str | None = None) -> tuple[dict[str, float], LMOutputs]:
        """The model's metrics and outputs. A collective: every worker of a group calls it with the group's comm,
        and all get the same numbers (the module as handed: plain, DDP's inner module, peft or FSDP2-sharded)."""
        from unlearn.data.qa_batches import as_adapter
        from unlearn.lm_sharding import is_fully_sharded

        comm = comm or LocalComm()
        tok = as_adapter(self.tokenizer())
        with lm._evaluating(model) as model_device:
            where = torch.device(device) if device is not None else model_device  # where collectives run
            mine = {side: self._share(len(self.sides[side]), comm) for side in SIDES}
            local = self._teacher_forced(model, tok, mine, comm, model_device, where)
            tokens = {}
            for side in SIDES:  # held-out ROUGE: how well a model answers people it never saw (retrain's forget)
                answers, tokens[side] = self._greedy(model, tok, side, mine[side], comm, where)
                refs = [self.sides[side].answer[i] for i in mine[side]]
                local[side][:, ROUGE] = lm.rouge_l_recall(answers, refs) if refs else np.zeros(0)
        if is_fully_sharded(model):
            model.reshard()  # a no-grad forward leaves the root's parameters gathered
        rows = {side: self._gather(comm, torch.from_numpy(local[side]), where).numpy() for side in SIDES}
        sample = self._sample_answers(tok, mine["forget"], tokens["forget"], comm, where)
        return self._metrics(rows), LMOutputs(rows["forget"][:, TRUTH].copy(), rows["forget"][:, MIN_K].copy(),
                                              rows["held_out"][:, MIN_K].copy(), sample)

    def _share(self, n: int, comm: Comm) -> np.ndarray:
        """This rank's row positions: a contiguous run of whole `batch_size` chunks (see the module docstring)."""
        b = self.batch_size
        chunks = eval_share(-(-n // b), comm.world_size, comm.rank)
        if not len(chunks):
            return np.zeros(0, dtype=np.int64)
        return np.arange(int(chunks[0]) * b, min((int(chunks[-1]) + 1) * b, n), dtype=np.int64)

    def _chunks(self, positions: np.ndarray) -> list[np.ndarray]:
        return [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]

    def _teacher_forced(self, model: nn.Module, tok: Any, mine: dict[str, np.ndarray], comm: Comm,
                        model_device: torch.device, where: torch.device) -> dict[str, np.ndarray]:
        """Per local row: answer probability, Min-K% Prob and (forget, retain) truth ratio; ROUGE left NaN."""
        from unlearn.data.qa_batches import encode_qa

        jobs: list[tuple[str, str, np.ndarray, Any]] = []  # (side, kind, row positions, batch)
        for side in SIDES:
            texts = self.sides[side]
            for pos in self._chunks(mine[side]):
                q = [texts.question[i] for i in pos]
                jobs.append((side, "answer", pos, encode_qa(tok, q, [texts.answer[i] for i in pos])))
                if side == "held_out":  # non-members: the attack's scores only
                    continue
                jobs.append((side, "paraphrase", pos, encode_qa(tok, q, [texts.paraphrase[i] for i in pos])))
                owner = np.repeat(pos, [len(texts.perturbed[i]) for i in pos])
                flat = encode_qa(tok, [texts.question[i] for i in owner],
                                 [a for i in pos for a in texts.perturbed[i]])
                for start in range(0, len(owner), self.batch_size):
                    jobs.append((side, "perturbed", owner[start:start + self.batch_size],
                                 flat.rows(start, start + self.batch_size)))
        scored = _lockstep_logprobs(model, [job[3] for job in jobs], comm, model_device, where)
        local = {side: np.full((len(mine[side]), 4), np.nan) for side in SIDES}
        index = {side: {int(p): k for k, p in enumerate(mine[side])} for side in SIDES}
        perturbed: dict[str, dict[int, list[float]]] = {side: {} for side in SIDES}
        right: dict[str, dict[int, float]] = {side: {} for side in SIDES}
        for (side, kind, pos, batch), (values, rows) in zip(jobs, scored):
            counts = batch.num_answer_tokens.double().numpy()
            # summed in float32 as lm_metrics.sequence_logprob, so both give the same numbers
            sums = torch.zeros(len(batch), dtype=torch.float32).index_add_(0, rows, values).double().numpy()
            mean_lp = sums / counts
            if kind == "answer":
                for j, p in enumerate(pos):
                    local[side][index[side][int(p)], PROB] = float(np.exp(mean_lp[j]))
                    local[side][index[side][int(p)], MIN_K] = _min_k(values[rows == j])
            elif kind == "paraphrase":
                right[side].update({int(p): float(mean_lp[j]) for j, p in enumerate(pos)})
            else:
                for j, p in enumerate(pos):
                    perturbed[side].setdefault(int(p), []).append(float(mean_lp[j]))
        for side in ("forget", "retain"):
            for p, k in index[side].items():  # geometric mean over the perturbed answers, as lm_metrics.truth_ratio
                local[side][k, TRUTH] = float(np.exp(np.mean(perturbed[side][p]) - right[side][p]))
        return local

    def _max_new_tokens(self, tok: Any) -> int:
        """The longest reference answer (of every side, tokens plus its <eos>) and a little room: the
        same on every rank, since every rank holds every side's texts. Encoded once per evaluator (the texts and
        the tokenizer never change), not per side and evaluation."""
        if self._new_tokens is None:
            answers = [a for side in SIDES for a in self.sides[side].answer]
            longest = max((len(ids) for ids in tok.encode_many(answers)), default=0)
            self._new_tokens = longest + 1 + EXTRA_NEW_TOKENS
        return self._new_tokens

    def _greedy(self, model: nn.Module, tok: Any, side: str, positions: np.ndarray, comm: Comm,
                where: torch.device) -> tuple[list[str], torch.Tensor]:
        """Greedy answers to this rank's questions of `side` (decoded, cut at <eos>), and their raw tokens; every
        rank runs as many `synced_greedy` calls as the rank with the most chunks."""
        from unlearn.data.qa_batches import encode_prompts
        from unlearn.lm_sharding import synced_greedy

        steps = self._max_new_tokens(tok)
        chunks = self._chunks(positions)
        calls = int(comm.all_reduce(torch.tensor([len(chunks)], device=where), op="max").item())
        texts = self.sides[side]
        out = []
        for k in range(calls):
            if k < len(chunks):
                prompts = encode_prompts(tok, [texts.question[i] for i in chunks[k]])
                ids, mask = prompts.input_ids, prompts.attention_mask
            else:  # no prompts here: still one forward per step with the others
                ids = mask = torch.zeros((0, 1), dtype=torch.long)
            out.append(synced_greedy(model, ids, mask, steps, tok.pad_id, tok.eos_id, comm=comm).cpu())
        tokens = torch.cat(out) if out else torch.zeros((0, steps), dtype=torch.long)
        return [_decode(tok, row) for row in tokens.tolist()], tokens

    def _sample_answers(self, tok: Any, positions: np.ndarray, tokens: torch.Tensor, comm: Comm,
                        where: torch.device) -> list[tuple[str, str, str, float]]:
        """The first `sample_answers` forget rows' (question, reference, greedy answer, ROUGE-L recall), gathered
        as token ids so every rank returns the same list."""
        keep = positions < self.sample_answers
        gathered = self._gather(comm, tokens[torch.from_numpy(keep)], where)
        texts = self.sides["forget"]
        answers = [_decode(tok, row) for row in gathered.tolist()]
        refs = texts.answer[:len(answers)]
        recall = lm.rouge_l_recall(answers, refs) if answers else []
        return [(texts.question[i], refs[i], answers[i], float(recall[i])) for i in range(len(answers))]

    @staticmethod
    def _gather(comm: Comm, values: torch.Tensor, where: torch.device) -> torch.Tensor:
        """Every rank's rows in rank order (each rank's rows are contiguous and in row order: the side in order)."""
        return comm.all_gather(values.contiguous().to(where)).cpu()

    @staticmethod
    def _metrics(rows: dict[str, np.ndarray]) -> dict[str, float]:
        forget, retain, held_out = rows["forget"], rows["retain"], rows["held_out"]

        def mean(a: np.ndarray) -> float:
            return float(np.mean(a)) if len(a) else float("nan")

        metrics = {
            "forget_prob": mean(forget[:, PROB]), "retain_prob": mean(retain[:, PROB]),
            "held_out_prob": mean(held_out[:, PROB]),  # free (the attack's forward): what retrain's forget_prob nears
            "forget_ROUGE": mean(forget[:, ROUGE]), "retain_ROUGE": mean(retain[:, ROUGE]),
            "held_out_ROUGE": mean(held_out[:, ROUGE]),
            "forget_truth_ratio": mean(forget[:, TRUTH]),
            "model_utility": lm.model_utility(retain[:, PROB], retain[:, ROUGE], retain[:, TRUTH])
            if len(retain) else float("nan"),
            "mia_auc": lm.auc(forget[:, MIN_K], held_out[:, MIN_K]) if len(forget) and len(held_out)
            else float("nan"),
        }
        return metrics

    # --- on the driver ---------------------------------------------------------------------------------------------

    def compare(self, metrics: dict[str, float], out: LMOutputs | None, ref_metrics: dict[str, float],
                ref_out: LMOutputs | None) -> dict[str, float]:
        """Forget quality (KS p-value of the forget truth ratios vs the reference's), PrivLeak (vs the reference's
        Min-K% AUC) and `gap`; nothing where either side's outputs are missing.

        `gap` is the language-model counterpart of the classifiers' Avg.D, in percent: the mean absolute distance
        to the reference over forget and retain answer probability and ROUGE-L, the membership AUC, and the KS
        statistic D of the forget truth ratios (the distance whose p-value is forget quality; D is smooth where the
        p-value saturates). 0 = indistinguishable from retrain on every count; what `unlearn tune` minimises."""
        if out is None or ref_out is None:
            return {}
        result = {}
        distances = [abs(metrics[k] - ref_metrics[k]) for k in GAP_TERMS
                     if np.isfinite(metrics.get(k, np.nan)) and np.isfinite(ref_metrics.get(k, np.nan))]
        if len(out.forget_truth_ratio) and len(ref_out.forget_truth_ratio):
            result["forget_quality"] = lm.forget_quality(out.forget_truth_ratio, ref_out.forget_truth_ratio)
            distances.append(float(ks_2samp(out.forget_truth_ratio, ref_out.forget_truth_ratio).statistic))
        auc_model, auc_ref = metrics.get("mia_auc"), ref_metrics.get("mia_auc")
        if auc_model is not None and auc_ref is not None and np.isfinite(auc_model) and np.isfinite(auc_ref):
            result["privleak"] = lm.privleak(auc_model, auc_ref)
        if distances:
            result["gap"] = 100.0 * float(np.mean(distances))
        return result

    def artifacts(self, model: nn.Module, name: str, folder: Path, out: LMOutputs | None = None) -> list[Path]:
        """`answers_<name>.csv`: question, reference and greedy answer of the first forget rows, from what
        `evaluate` decoded on the workers (nothing is generated on the driver; [] without `out`). Copied next to
        results.json when the job sets `out_dir`."""
        if out is None or not out.answers:
            return []
        path = Path(folder) / f"answers_{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["question", "reference", "answer", "rouge_l_recall"])
            writer.writerows([q, ref, ans, f"{r:.3f}"] for q, ref, ans, r in out.answers)
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(self.out_dir) / path.name)
        return [path]


def _min_k(values: torch.Tensor, k: float = lm.MIN_K) -> float:
    """Min-K% Prob of one row's labelled-token log-probs, as lm_metrics.min_k_prob (its last one, <eos>, left out)."""
    lp = values[:-1]
    if lp.numel() == 0:
        from unlearn.errors import BadInput

        raise BadInput("min_k_prob: a row has no answer token before its <eos>")
    return float(torch.sort(lp).values[:max(1, int(lp.numel() * k))].double().mean())


def _decode(tok: Any, row: list[int]) -> str:
    """A greedy continuation cut at its first <eos>, decoded without special tokens (as lm_metrics.greedy_answers)."""
    cut = row.index(tok.eos_id) if tok.eos_id in row else len(row)
    return tok.decode(row[:cut]).strip()


def _lockstep_logprobs(model: nn.Module, batches: list[Any], comm: Comm, model_device: torch.device,
                       where: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """lm_metrics' labelled-token log-probs (values, row index, on the CPU) of each batch, one forward each; a rank
    with fewer batches than another runs one-row filler forwards until all have run as many (FSDP2's forwards are
    collectives)."""
    from unlearn.lm_sharding import filler_row

    total = int(comm.all_reduce(torch.tensor([len(batches)], device=where), op="max").item())
    out = []
    for k in range(total):
        if k < len(batches):
            values, rows = lm._token_logprobs(model, batches[k].to(model_device))
            out.append((values.cpu(), rows.cpu()))
        else:
            ids, mask, _ = filler_row(1, 0, model_device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out


__all__ = ["LMOutputs", "LanguageModellingEvaluator", "MAX_RETAIN", "SideTexts", "retain_subset"]
