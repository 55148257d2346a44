"""A teacher's stored signal for a student with another tokenizer: the rows' responses re-tokenized
by the student and the two tokenizations aligned on byte boundaries (as GOLD does, Patiño et al. 2025).

For one response, with e_T and e_S the byte offsets where each teacher and student token ends, the
boundaries both share, B = e_T ∩ e_S, cut it into groups: the tokens between two shared boundaries.
A group is one to one (a teacher token and a student token covering the same bytes), one to many,
many to one or many to many.

- One to one: the teacher's top-k is mapped onto student ids by identical token bytes
  (`token_bytes.same_text_ids`); a candidate the student lacks is UNMAPPED (its mass joins the tail)
  and the chosen divergence applies as for a shared tokenizer, with the `bucket` tail. The student's
  longer tokens that begin with the text's own token are priced along the text (`_longer`); those
  that begin with another candidate stay in the tail (the byte-prefix marginal for all of them was
  measured worse: docs/objectives.md).
- Otherwise: the group's text g is one event both models give a probability to, the teacher
  log p(g) = Σ log p(y_t) over its tokens (stored: `token_logprob`), the student log q(g) likewise over
  its own, and the loss takes the chosen divergence between the two-point distributions
  (p(g), 1 − p(g)) and (q(g), 1 − q(g)). By the data-processing inequality this is at most the
  divergence of the whole distributions over continuations, and zero when they agree. We prefer it
  to ULD's distance between sorted probability vectors (Boizard et al. 2024), which GOLD keeps for
  the unmatched vocabulary: sorting forgets which token carries which mass, and a stored top-k at
  the group's first position is conditioned on a prefix the student never splits the same way.
- The teacher's end of turn maps to the student's (`between`), a one-to-one group of its own, so the
  student learns to stop.

The student's tokens are its tokenization of the response's text, or for its own samples (a round's,
which the teacher scored in its tokens: `student_completion_token_ids`) the very tokens it sampled.
Only the response is aligned: the prompt is rendered by the student's own chat template
(training/models/chat.py). When both tokenizers are the same (equal `tokenizer_hash`) nothing here
runs and the loss is the shared-tokenizer one, exactly.
"""

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from training.models.batches import flat_values, list_lengths
from training.models.token_bytes import TokenBytes, same_text_ids
from training.schema.signal import nested_lists

UNMAPPED = -1e4  # a top-k logprob the student has no token for: probability 0 on both sides, in float32
COUNTS = ["teacher_tokens", "one_to_one", "topk_mass", "topk_mass_mapped"]


def byte_ends(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """The UTF-8 byte offset where each token ends, from its (start, end) character offsets in `text`."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    char_ends = np.concatenate([[0], np.cumsum(widths)])
    return char_ends[np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))]


def groups(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's group: the number of shared boundaries before its end (tokens past the last
    shared boundary, where the texts differ, form one last group)."""
    shared = np.intersect1d(teacher_ends, student_ends)
    return np.searchsorted(shared, teacher_ends), np.searchsorted(shared, student_ends)


@dataclass
class CrossTokenizer:
    """Rows of teacher token ids → rows of the student's tokens with the aligned signal."""

    teacher: TokenBytes
    student_tokenizer: object
    to_student: np.ndarray  # (teacher vocabulary,) the student id of each teacher id, −1: none
    teacher_ends_turn: np.ndarray  # (teacher vocabulary,) bool: the teacher's end-of-turn ids, mapped in `to_student`
    teacher_tokenizer_hash: str  # the rows this aligns store their signal in these ids (their `tokenizer_hash`)
    student: TokenBytes  # the student's tokens' bytes: the byte offsets of the ids it sampled
    student_end_ids: list[int]
    student_by_text: dict[bytes, int]  # the student's id of each token's bytes
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0.0))  # over every row aligned so far

    @classmethod
    def between(cls, teacher: TokenBytes, teacher_end_ids: list[int], student_tokenizer, student_end_ids: list[int],
                teacher_tokenizer_hash: str) -> "CrossTokenizer":
        """The teacher's tokens (from its tokenizer, or as stored: `token_bytes.token_table`) and the student's
        tokenizer. `*_end_ids`: the ids that end a turn, the one a chat template ends the assistant's turn
        with first (generation_config's eos_token_id order). A teacher's end of turn becomes the student's of
        the same name (<|im_end|> for <|im_end|>), else the student's first."""
        student = TokenBytes.of(student_tokenizer)
        to_student = same_text_ids(teacher, student)
        teacher_names = {i: name for name, i in teacher.names.items()}
        for end in teacher_end_ids:
            to_student[end] = student.names.get(teacher_names.get(end), student_end_ids[0])
        ends_turn = np.zeros(len(teacher.texts), dtype=bool)
        ends_turn[teacher_end_ids] = True
        return cls(teacher, student_tokenizer, to_student, ends_turn, teacher_tokenizer_hash, student, list(student_end_ids),
                   student.ids_by_text())

    def coverage(self) -> dict[str, float]:
        """Over the rows aligned so far: the share of the teacher's tokens in one-to-one groups, and of
        the top-k mass there that maps onto student tokens."""
        counts = self.counts
        return {"teacher_tokens_one_to_one": counts["one_to_one"] / max(1.0, counts["teacher_tokens"]),
                "topk_mass_mapped": counts["topk_mass_mapped"] / max(1e-12, counts["topk_mass"])}

    def __call__(self, rows: pa.Table) -> pa.Table:
        """`rows` (completion_token_ids, teacher ids) with the student's completion_token_ids; with the
        stored signal also its topk_ids, topk_logprobs (sorted, UNMAPPED last), tail_mass and
        token_logprob per student token, and `aligned` (a one-to-one token with a mapped candidate),
        `group` and `group_logprob` (log p(g) of its group's text; NaN on aligned tokens). The student's
        tokens are its re-tokenization of the text, or, for its own samples (a round's, scored in the
        teacher's tokens: `student_completion_token_ids`), the very tokens it sampled."""
        lengths = list_lengths(rows["completion_token_ids"])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        ids = flat_values(rows["completion_token_ids"], 1).astype(np.int64)
        signal = "topk_ids" in rows.column_names
        token_logprob = flat_values(rows["token_logprob"], 1).astype(np.float32) if signal else np.zeros(len(ids), np.float32)
        ended = np.array([n > 0 and self.teacher_ends_turn[ids[s + n - 1]] for s, n in zip(starts, lengths)], dtype=bool)
        texts = [b"".join(self.teacher.texts[i] for i in ids[s : s + n - e]) for s, n, e in zip(starts, lengths, ended)]
        decoded = [text.decode("utf-8", errors="replace") for text in texts]
        sampled = rows["student_completion_token_ids"].to_pylist() if "student_completion_token_ids" in rows.column_names else None
        student = None if sampled else self.student_tokenizer(decoded, add_special_tokens=False, return_offsets_mapping=True)
        teacher_lengths = self.teacher.lengths
        out = {name: [] for name in ("ids", "teacher_token", "following", "group", "group_logprob")}
        per_row, one_to_one = [], 0
        for row, (s, n, e) in enumerate(zip(starts, lengths, ended)):
            body = np.arange(s, s + n - e)
            teacher_ends = np.cumsum(teacher_lengths[ids[body]])
            end = self.to_student[ids[s + n - 1]] if e else None  # the student's end of turn, its own group below
            if sampled:  # the tokens it sampled, its end of turn as it sampled it
                student_ids = np.array(sampled[row], dtype=np.int64)
                if e and len(student_ids) and student_ids[-1] in self.student_end_ids:
                    student_ids, end = student_ids[:-1], student_ids[-1]
                student_ends = np.cumsum(self.student.lengths[student_ids])
                same_text = b"".join(self.student.texts[i] for i in student_ids) == texts[row]
            else:
                student_ids = np.array(student["input_ids"][row], dtype=np.int64)
                same_text = decoded[row].encode() == texts[row]
                student_ends = byte_ends(decoded[row], student["offset_mapping"][row]) if same_text else None
            if same_text:
                teacher_group, student_group = groups(teacher_ends, student_ends)
            else:  # not UTF-8 (a response cut inside a character): one group, nothing mapped token by token
                teacher_group, student_group = np.zeros(len(body), np.int64), np.zeros(len(student_ids), np.int64)
            count = int(max(teacher_group.max(initial=-1), student_group.max(initial=-1)) + 1)
            teacher_count, student_count = np.bincount(teacher_group, minlength=count), np.bincount(student_group, minlength=count)
            single = (teacher_count == 1) & (student_count == 1)
            teacher_of_group = np.full(count, -1, dtype=np.int64)
            teacher_of_group[teacher_group[single[teacher_group]]] = body[single[teacher_group]]
            teacher_token = np.where(single[student_group], teacher_of_group[student_group], -1)
            empty = teacher_token >= 0
            empty[empty] = teacher_lengths[ids[teacher_token[empty]]] == 0  # a special token inside: no bytes to share
            teacher_token[empty] = -1
            group_logprob = np.bincount(teacher_group, weights=token_logprob[body], minlength=count)[student_group]
            if e:  # the end of turn: its own one-to-one group
                student_ids, teacher_token = np.append(student_ids, end), np.append(teacher_token, s + n - 1)
                student_group, group_logprob = np.append(student_group, count), np.append(group_logprob, 0.0)
            one_to_one += int(single.sum()) + int(e)
            out["ids"].append(student_ids)
            out["teacher_token"].append(teacher_token)
            out["following"].append(np.where((teacher_token >= 0) & (teacher_token + 1 < s + n - e), teacher_token + 1, -1))
            out["group"].append(student_group)
            out["group_logprob"].append(group_logprob)
            per_row.append(len(student_ids))
        student_ids, teacher_token = np.concatenate(out["ids"]), np.concatenate(out["teacher_token"])
        per_row = np.array(per_row, dtype=np.int64)
        self.counts["teacher_tokens"] += len(ids)
        self.counts["one_to_one"] += one_to_one
        id_type = rows.schema.field("completion_token_ids").type.value_type
        columns = {"completion_token_ids": nested_lists(student_ids, per_row, None, id_type)}
        if signal:
            columns.update(self._signal_columns(rows, student_ids, teacher_token, np.concatenate(out["following"]), ids, token_logprob,
                                                np.concatenate(out["group"]), np.concatenate(out["group_logprob"]), per_row))
        for name, column in columns.items():
            index = rows.schema.get_field_index(name)
            rows = rows.set_column(index, name, column) if index >= 0 else rows.append_column(name, column)
        return rows

    def _signal_columns(self, rows, student_ids, teacher_token, following, teacher_ids, token_logprob, group, group_logprob,
                        per_row) -> dict[str, pa.Array]:
        k = int(rows["k"][0].as_py())
        topk_ids = flat_values(rows["topk_ids"], 2).astype(np.int64).reshape(-1, k)
        topk_logprobs = flat_values(rows["topk_logprobs"], 2).astype(np.float32).reshape(-1, k)
        tail = flat_values(rows["tail_mass"], 1).astype(np.float32)
        mapped_ids, mapped_logprobs, mapped_tail, mapped_token_logprob, aligned = self._mapped(
            student_ids, teacher_token, following, teacher_ids, topk_ids, topk_logprobs, tail, token_logprob)
        group_logprob = np.where(aligned, np.nan, group_logprob).astype(np.float32)
        width = mapped_ids.shape[1]  # the teacher's k candidates, then up to k longer student tokens (`_longer`)
        return {
            "k": pa.array(np.full(rows.num_rows, width, dtype=np.int32)),
            "topk_ids": nested_lists(mapped_ids.astype(np.int32), per_row, width, pa.int32()),
            "topk_logprobs": nested_lists(mapped_logprobs, per_row, width, pa.float32()),
            "tail_mass": nested_lists(mapped_tail, per_row, None, pa.float32()),
            "token_logprob": nested_lists(mapped_token_logprob, per_row, None, pa.float32()),
            "aligned": nested_lists(aligned, per_row, None, pa.bool_()),
            "group": nested_lists(group.astype(np.int32), per_row, None, pa.int32()),
            "group_logprob": nested_lists(group_logprob, per_row, None, pa.float32()),
        }

    def _longer(self, ids, logprobs, actual, teacher_token, following, teacher_ids, topk_ids, topk_logprobs):
        """The student's tokens of two teacher tokens' text that begin with the one-to-one token's: where the
        text goes on after teacher token t, the teacher's top-k at t + 1 is conditioned on that same text, so
        the student's token of bytes(y_t) + bytes(x) has p = p_t(y_t) · p_{t+1}(x), and its token of y_t alone
        keeps p_t(y_t) · (1 − Σ_x p_{t+1}(x)) (a tokenizer that merges writes "1" alone only where no merge
        follows). Updates `logprobs` of the actual candidate in place; returns (ids, logprobs) (n, k), −1
        and UNMAPPED where none."""
        n, k = len(ids), topk_ids.shape[1]
        longer_ids, longer_logprobs = np.full((n, k), -1, np.int64), np.full((n, k), UNMAPPED, np.float32)
        mapped_actual = actual & (logprobs > UNMAPPED / 2)
        for i in np.nonzero((following >= 0) & mapped_actual.any(1))[0]:
            head, column = self.teacher.texts[teacher_ids[teacher_token[i]]], int(mapped_actual[i].argmax())
            for j, x in enumerate(topk_ids[following[i]]):
                text = self.teacher.texts[x] if x < len(self.teacher.texts) else b""
                student = self.student_by_text.get(head + text) if text else None
                if student is not None and student not in ids[i]:
                    longer_ids[i, j], longer_logprobs[i, j] = student, logprobs[i, column] + topk_logprobs[following[i], j]
            taken = np.exp(topk_logprobs[following[i]][longer_ids[i] >= 0].astype(np.float64)).sum()
            logprobs[i, column] += np.log(max(1.0 - taken, float(np.finfo(np.float32).tiny)))
        return longer_ids, longer_logprobs

    def _mapped(self, student_ids, teacher_token, following, teacher_ids, topk_ids, topk_logprobs, tail, token_logprob):
        """Per student token: the teacher's top-k at its one-to-one teacher token in student ids, then the
        student's longer tokens that begin with it, priced along the text (`_longer`) (UNMAPPED and the
        token's own id where the student has none, sorted last), the tail with the unmapped mass, the
        teacher's token logprob; and whether it is aligned. Counts the top-k mass mapped."""
        has = teacher_token >= 0
        source = np.where(has, teacher_token, 0)
        candidates = topk_ids[source]
        ids = np.where(candidates < len(self.to_student), self.to_student[np.minimum(candidates, len(self.to_student) - 1)], -1)
        found = (ids >= 0) & has[:, None]
        logprobs = np.where(found, topk_logprobs[source], UNMAPPED).astype(np.float32)
        ids = np.where(found, ids, student_ids[:, None])
        longer_ids, longer_logprobs = self._longer(ids, logprobs, candidates == teacher_ids[source][:, None], teacher_token,
                                                   following, teacher_ids, topk_ids, topk_logprobs)
        ids = np.concatenate([ids, np.where(longer_ids >= 0, longer_ids, student_ids[:, None])], 1)
        logprobs = np.concatenate([logprobs, longer_logprobs], 1)
        order = np.argsort(-logprobs, axis=1, kind="stable")
        ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
        ids = np.where(logprobs <= UNMAPPED, ids[:, :1], ids)  # an id already in the support: the bucket's tail stays exact
        probabilities = np.exp(topk_logprobs[source]) * has[:, None]
        lost = (probabilities * ~found).sum(1)
        mapped_tail = np.where(has, np.clip(tail[source] + lost, 0.0, 1.0), 1.0).astype(np.float32)
        self.counts["topk_mass"] += float(probabilities.sum())
        self.counts["topk_mass_mapped"] += float((probabilities * found).sum())
        return ids, logprobs, mapped_tail, np.where(has, token_logprob[source], np.nan).astype(np.float32), found.any(1)
