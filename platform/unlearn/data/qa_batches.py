"""Question-answer pairs framed as causal-LM sequences: what the LM unlearning methods train on and the metrics score.

What. `encode_qa` turns (question, answer) pairs into one right-padded batch

    input_ids  = <bos> question-tokens answer-tokens <eos> <pad> ...
    labels     = -100  -100 ...        answer-tokens <eos> -100  ...
    attention_mask = 1 over the sequence, 0 over the padding

and `encode_prompts` turns questions into a left-padded batch `<bos> question-tokens` to generate answers from
(left padding puts every row's last real token in the last column, so one forward pass predicts every row's next
token).

Why <eos> is labelled. TOFU (its data module appends one <eos> to the labels) and open-unlearning
(`preprocess_chat_instance` appends `eos_token_id` to the sequence and labels everything after the prompt) both
score the answer *and* its <eos>: the answer probability p(a|q)^(1/|a|) has |a| = answer tokens + 1, and a model
trained on these sequences learns to stop, which greedy decoding needs. Their Min-K% attack leaves that last
<eos> out again (`tokenwise_logprobs` drops the last labelled position); `lm_metrics.min_k_prob` does the same.
`QABatch.num_answer_tokens` counts the labelled positions, <eos> included: the |a| of the normalisation.

Why the answer is split off a joint encoding. The answer's tokens are those of `question + " " + answer` after the
question's own tokens: the tokens a model sees (and must generate) after the prompt, whatever the tokenizer does
with a leading space (GPT-2 encodes "Lisbon" alone differently from " Lisbon" after a question). The facts
tokenizer (data/facts.py) encodes an answer the same alone as after a question, so there both ways agree. Should a
tokenizer merge across the boundary (the question's tokens are then no prefix of the joint ones), the question
part is the longest common prefix, so the labels start where the two encodings part: a conservative version of
open-unlearning's `len(prompt_ids)` cut, which would label from a fixed offset whether or not it matched.

Why too long is an error. A pair longer than `max_length` would lose answer tokens (or its <eos>) to truncation
and be scored on a different answer than the one asked about; it is refused (BadInput, one line) instead.

Tokenizers. Either a `tokenizers.Tokenizer` (the facts corpus's: <pad>=0 <bos>=1 <eos>=2 <unk>=3, no post-processor)
or a transformers tokenizer (`PreTrainedTokenizerFast`, e.g. from `models.causal_lm.load_tokenizer`), behind
`TokenizerAdapter`: ids of a string without special tokens, decode, and the <bos>/<eos>/<pad> ids. A transformers
tokenizer without a bos token (Qwen, some GPT-2 exports) uses its eos in that place: the document separator such
models saw before a new text, and a fixed first token so that no label ever sits at position 0. One without a pad
token pads with eos, then unk (padding is masked out of attention and labels, so any id serves; a new token would
grow a pretrained model's vocabulary). A bare `tokenizers.Tokenizer` says nothing of roles: they are found by
the usual spellings (the ones `models.causal_lm.load_tokenizer` reads from a bare tokenizer.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from unlearn.errors import BadInput

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # torch's cross-entropy default ignore_index, and what HF models skip in `labels`

# Spellings of the special tokens of a bare `tokenizers.Tokenizer` (its file does not name their roles).
_SPELLINGS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "eos": ("<eos>", "</s>", "<|endoftext|>", "[EOS]", "<|eos|>", "<|end_of_text|>"),
    "bos": ("<bos>", "<s>", "[BOS]", "<|bos|>", "<|startoftext|>", "<|begin_of_text|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


class TokenizerAdapter:
    """One interface over a `tokenizers.Tokenizer` and a transformers tokenizer: `encode` (ids of a string, no
    special tokens added), `decode` (special tokens skipped), and `bos_id`, `eos_id`, `pad_id`."""

    def __init__(self, tokenizer: "Tokenizer | PreTrainedTokenizerBase | TokenizerAdapter") -> None:
        if isinstance(tokenizer, TokenizerAdapter):
            tokenizer = tokenizer.tokenizer
        self.tokenizer = tokenizer
        # transformers tokenizers have `convert_tokens_to_ids`; a `tokenizers.Tokenizer` has `token_to_id`.
        self.is_hf = hasattr(tokenizer, "convert_tokens_to_ids")
        if self.is_hf:
            eos = tokenizer.eos_token_id
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
            pad = next((i for i in (tokenizer.pad_token_id, eos, tokenizer.unk_token_id) if i is not None), None)
        else:
            found = {role: next((tokenizer.token_to_id(s) for s in spellings if tokenizer.token_to_id(s) is not None),
                                None) for role, spellings in _SPELLINGS.items()}
            eos = found["eos"]
            bos = found["bos"] if found["bos"] is not None else eos
            pad = next((i for i in (found["pad"], eos, found["unk"]) if i is not None), None)
        if eos is None or pad is None:
            raise BadInput("tokenizer: no end-of-sequence token (<eos>, </s>, <|endoftext|>...): "
                           "answers cannot be framed or cut without one")
        self.bos_id, self.eos_id, self.pad_id = int(bos), int(eos), int(pad)

    def encode(self, text: str) -> list[int]:
        if self.is_hf:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if self.is_hf:
            return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def as_adapter(tokenizer: Any) -> TokenizerAdapter:
    """`tokenizer` behind a `TokenizerAdapter` (itself if it already is one)."""
    return tokenizer if isinstance(tokenizer, TokenizerAdapter) else TokenizerAdapter(tokenizer)


@dataclass
class QABatch:
    """Token ids, attention mask and labels (IGNORE_INDEX outside the scored tokens), all N x L int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "QABatch":
        return QABatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_answer_tokens(self) -> torch.Tensor:
        """Labelled positions per row (N,): the answer's tokens and its <eos> (0 for a prompt batch)."""
        return (self.labels != IGNORE_INDEX).sum(dim=1)

    def rows(self, start: int, stop: int) -> "QABatch":
        """Rows `start:stop`, without the columns that are padding in all of them (a short chunk of a long batch
        costs its own length). Works for right and for left padding."""
        mask = self.attention_mask[start:stop]
        used = torch.nonzero(mask.any(dim=0)).flatten()
        if used.numel() == 0:
            return QABatch(self.input_ids[start:stop], mask, self.labels[start:stop])
        cols = slice(int(used[0]), int(used[-1]) + 1)
        return QABatch(self.input_ids[start:stop, cols], mask[:, cols], self.labels[start:stop, cols])

    def position_ids(self) -> torch.Tensor:
        """Each token's position among its row's real tokens (padding gets 1, as transformers' generate gives it):
        with left padding, a row's first real token must still be position 0."""
        positions = self.attention_mask.long().cumsum(dim=1) - 1
        return positions.masked_fill(self.attention_mask == 0, 1)


# --- rows that travel as float32 "images" (data/facts_rows.py) -----------------------------------------------

EXACT_BELOW = 2 ** 24  # float32 holds every integer below this exactly


def pack_rows(batch: QABatch, length: int | None = None) -> "np.ndarray":
    """float32 N x 3 x 1 x L: input ids, labels, attention mask of each row, right-padded to `length` (pad id 0,
    labels IGNORE_INDEX, mask 0). The row store and streams carry it as they carry images; `unpack_rows` undoes it."""
    import numpy as np

    n, width = batch.input_ids.shape
    length = width if length is None else length
    if length < width:
        raise ValueError(f"pack_rows: rows are {width} tokens, longer than length {length}")
    if n and int(batch.input_ids.max()) >= EXACT_BELOW:
        raise BadInput(f"a token id is {EXACT_BELOW} or more: rows travel as float32, which would round it")
    out = np.zeros((n, 3, 1, length), dtype=np.float32)
    out[:, 1, 0, :] = IGNORE_INDEX
    out[:, 0, 0, :width] = batch.input_ids.numpy()
    out[:, 1, 0, :width] = batch.labels.numpy()
    out[:, 2, 0, :width] = batch.attention_mask.numpy()
    return out


def unpack_rows(x: torch.Tensor) -> QABatch:
    """The QABatch of packed rows (N x 3 x 1 x L float32, on any device), without the columns that are padding in
    every row (a batch of short pairs costs its own length)."""
    ids = x[:, :, 0, :].round().long()
    batch = QABatch(ids[:, 0], ids[:, 2], ids[:, 1])
    return batch.rows(0, len(batch)) if len(batch) else batch


def _split_answer(question_ids: list[int], joint_ids: list[int]) -> tuple[list[int], list[int]]:
    """(question part, answer part) of a joint encoding: the question part is the longest common prefix with the
    question's own encoding (all of it unless the tokenizer merged across the boundary)."""
    n = 0
    limit = min(len(question_ids), len(joint_ids))
    while n < limit and question_ids[n] == joint_ids[n]:
        n += 1
    return joint_ids[:n], joint_ids[n:]


def _pad(rows: list[list[int]], pad_value: int, left: bool) -> torch.Tensor:
    length = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode_qa(tokenizer: Any, questions: Sequence[str], answers: Sequence[str],
              max_length: int | None = None) -> QABatch:
    """Pairs framed as `<bos> question answer <eos>`, right-padded with the pad id; labels are the answer's tokens
    and its <eos>, IGNORE_INDEX elsewhere. BadInput (one line) for a pair longer than `max_length` tokens (nothing
    is truncated), an answer with no tokens, or lists of different lengths."""
    if len(questions) != len(answers):
        raise BadInput(f"encode_qa: {len(questions)} questions but {len(answers)} answers")
    tok = as_adapter(tokenizer)
    question_ids = tok.encode_many(questions)
    # A space joins them, as text would; the answer's tokens are the joint encoding's after the question's.
    joint_ids = tok.encode_many([f"{q} {a}" for q, a in zip(questions, answers)])
    inputs, labels = [], []
    for i, (q_ids, j_ids) in enumerate(zip(question_ids, joint_ids)):
        q_part, a_part = _split_answer(q_ids, j_ids)
        if not a_part:
            raise BadInput(f"encode_qa: answer {i} ({answers[i]!r}) has no tokens")
        ids = [tok.bos_id, *q_part, *a_part, tok.eos_id]
        if max_length is not None and len(ids) > max_length:
            raise BadInput(f"encode_qa: pair {i} is {len(ids)} tokens, more than max_length={max_length} "
                           f"(truncating would cut its answer): raise max_length or shorten it")
        inputs.append(ids)
        labels.append([IGNORE_INDEX] * (1 + len(q_part)) + [*a_part, tok.eos_id])
    input_ids = _pad(inputs, tok.pad_id, left=False)
    attention_mask = _pad([[1] * len(r) for r in inputs], 0, left=False)
    return QABatch(input_ids, attention_mask, _pad(labels, IGNORE_INDEX, left=False))


def encode_prompts(tokenizer: Any, questions: Sequence[str], max_length: int | None = None) -> QABatch:
    """Questions framed as `<bos> question`, left-padded with the pad id, for generation: every row ends in the
    last column, so one forward pass gives every row's next token. Labels are all IGNORE_INDEX. BadInput for a
    prompt longer than `max_length`."""
    tok = as_adapter(tokenizer)
    rows = [[tok.bos_id, *ids] for ids in tok.encode_many(questions)]
    if max_length is not None:
        for i, row in enumerate(rows):
            if len(row) > max_length:
                raise BadInput(f"encode_prompts: question {i} is {len(row)} tokens, more than max_length={max_length}")
    input_ids = _pad(rows, tok.pad_id, left=True)
    attention_mask = _pad([[1] * len(r) for r in rows], 0, left=True)
    return QABatch(input_ids, attention_mask, torch.full_like(input_ids, IGNORE_INDEX))
