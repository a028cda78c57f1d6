"""Quantization-aware fine-tuning with the targets' own quantizers (seed 000 step 7, seed 002).

:class:`FineTunePass` converts the annotated IR to torch (:class:`~qcompiler.torch_graph.GraphModule`),
fake-quantizes exactly what the target quantizes (fixed-point formats, integer codes chosen by
GPFQ, target weight grids; straight-through estimator), trains it, and writes the weights back
into the IR **on their grids**: every target then emits the fine-tuned model, and the
annotations (formats, codes, grids) stay consistent.

Training: cross-entropy on the first output (or MSE), optional knowledge distillation from
the float model's logits (MSE or KL at a temperature), Adam or SGD with momentum, a cosine,
step or constant LR schedule, a seed for determinism, a per-epoch log (train loss, held-out
top-1) stored as a :class:`~qcompiler.annotations.FineTuneLog`, and early stop when the
held-out top-1 (ties: the held-out loss) stops improving (the best epoch's weights are kept).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler import float_reference
from qcompiler.data import ArrayDataset, DataSource, load_dataset
from qcompiler.errors import DataError, QCompilerError
from qcompiler.graph import const_array, set_initializer, values_by_name
from qcompiler.progress import progress_bar

LOSSES = ("cross-entropy", "mse")
DISTILL = ("none", "mse", "kl")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "constant")


class FineTuneConfigError(QCompilerError):
    """A fine-tuning option is out of range."""


@dataclasses.dataclass(frozen=True)
class FineTunePass(ir.passes.InPlacePass):
    """Quantization-aware fine-tuning of an annotated model.

    Attributes:
        data: training data with ``labels`` (path, mapping, dataset, or an iterable of batches such
            as a torch ``DataLoader`` of ``(inputs, labels)``, collected once); ``labels`` may be
            absent when ``distill`` is set and ``distill_weight`` is 1.
        eval_data: held-out data with ``labels`` for the per-epoch metric and early stop;
            without it, ``holdout`` of the training samples (a seeded random subset) are held out.
        holdout: the fraction of ``data`` held out when ``eval_data`` is None (0 = none:
            early stop then follows the training loss).
        epochs: training epochs.
        batch_size: training batch size.
        lr: the initial learning rate.
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        schedule: ``cosine`` (to 0 over the epochs), ``step`` (×0.1 at 2/3) or ``constant``.
        weight_decay: L2 weight decay.
        loss: ``cross-entropy`` (labels) or ``mse`` (labels are regression targets).
        distill: knowledge distillation from the float model: ``none``, ``mse`` or ``kl``.
        distill_weight: the distillation term's weight α (loss = (1−α)·task + α·distill).
        temperature: the KL distillation temperature.
        patience: epochs without held-out improvement before stopping (0 = never stop early).
        seed: seeds torch and the shuffling (same seed, same weights).
        show_progress: a progress bar on a terminal.
        module: the ``torch.nn.Module`` the model was lowered from (optional): it is trained in
            place, i.e. its parameters receive the fine-tuned weights (see :func:`write_into_module`).
    """

    data: DataSource | None = dataclasses.field(default=None, repr=False, compare=False)
    eval_data: DataSource | None = dataclasses.field(default=None, repr=False, compare=False)
    holdout: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "cosine"
    weight_decay: float = 0.0
    loss: str = "cross-entropy"
    distill: str = "none"
    distill_weight: float = 0.5
    temperature: float = 4.0
    patience: int = 3
    seed: int = 0
    show_progress: bool = dataclasses.field(default=True, repr=False, compare=False)
    module: object | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.distill in DISTILL, f"distill must be one of {', '.join(DISTILL)}, got {self.distill!r}"),
            (0.0 <= self.distill_weight <= 1.0, f"distill_weight must be in [0, 1], got {self.distill_weight}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (0.0 <= self.holdout < 1.0, f"holdout must be in [0, 1), got {self.holdout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FineTuneConfigError(f"fine-tune: {message}")

    def requires(self, model: ir.Model) -> None:
        if self.data is None:
            raise ir.passes.PreconditionError("FineTunePass needs training data (data=...)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import torch

        from qcompiler.torch_graph import GraphModule

        train = load_dataset(self.data, model)
        needs_labels = self.distill == "none" or self.distill_weight < 1.0
        if needs_labels and train.labels is None:
            raise DataError("fine-tune data has no 'labels' array (needed by the loss; or distill with distill_weight=1)")
        held_out = load_dataset(self.eval_data, model) if self.eval_data is not None else None
        if held_out is None and self.holdout > 0 and train.labels is not None:
            train, held_out = split_holdout(train, self.holdout, self.seed)
        if held_out is not None and held_out.labels is None:
            raise DataError("fine-tune evaluation data has no 'labels' array")
        torch.manual_seed(self.seed)
        module = GraphModule(model, quantize=True)
        module.fit_pending_codebooks({k: torch.from_numpy(np.ascontiguousarray(v[:256])) for k, v in train.arrays.items()})
        teacher = _teacher_logits(model, train, self.batch_size) if self.distill != "none" else None
        _check_label_shape(module, train, self.loss)
        log = self._train(module, train, held_out, teacher)
        _write_back(model, module)
        if self.module is not None:
            write_into_module(model, self.module)
        ann.set(model, log)
        return ir.passes.PassResult(model, True)

    # ------------------------------------------------------------------ training

    def _train(self, module, train: ArrayDataset, held_out: ArrayDataset | None, teacher: np.ndarray | None) -> ann.FineTuneLog:
        import torch

        params = list(module.params.values())
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        sched = _scheduler(opt, self.schedule, self.epochs)
        generator = np.random.default_rng(self.seed)
        n = train.num_samples
        rows: list[dict[str, float]] = []
        best = ((-np.inf,), None, 0)  # (metric, state, epoch)
        stale = 0
        with progress_bar("fine-tune", total=self.epochs * -(-n // self.batch_size), enabled=self.show_progress) as advance:
            for epoch in range(self.epochs):
                start = time.perf_counter()
                module.train()
                order = generator.permutation(n)
                total, seen = 0.0, 0
                for i in range(0, n, self.batch_size):
                    idx = order[i : i + self.batch_size]
                    loss = self._loss(module, train, idx, teacher)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                    advance(1)
                sched.step()
                row = {"epoch": epoch + 1, "train_loss": total / seen, "seconds": round(time.perf_counter() - start, 4),
                       "lr": float(opt.param_groups[0]["lr"])}
                metric = (-row["train_loss"],)
                if held_out is not None:
                    # top-1 first, the held-out loss breaks ties (a small hold-out saturates)
                    row["eval_top1"], row["eval_loss"] = evaluate(module, held_out, self.batch_size, self.loss)
                    metric = (row["eval_top1"], -row["eval_loss"])
                rows.append(row)
                if metric > best[0]:
                    best, stale = (metric, {k: v.detach().clone() for k, v in module.params.items()}, epoch + 1), 0
                else:
                    stale += 1
                    if self.patience and stale >= self.patience:
                        break
        with torch.no_grad():
            for k, v in best[1].items():
                module.params[k].copy_(v)
        return ann.FineTuneLog(epochs=tuple(_rounded(r) for r in rows), best_epoch=int(best[2]),
                               stopped_early=len(rows) < self.epochs)

    def _loss(self, module, train: ArrayDataset, idx: np.ndarray, teacher: np.ndarray | None):
        import torch
        import torch.nn.functional as F

        feed = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in train.arrays.items()}
        out = module(**feed)[0]
        terms = []
        alpha = self.distill_weight if teacher is not None else 0.0
        if alpha < 1.0:
            target = torch.from_numpy(np.asarray(train.labels)[idx])
            task = F.cross_entropy(out, target.long()) if self.loss == "cross-entropy" else F.mse_loss(out, target.to(out.dtype))
            terms.append((1.0 - alpha) * task)
        if teacher is not None:
            ref = torch.from_numpy(teacher[idx]).to(out.dtype)
            if self.distill == "mse":
                kd = F.mse_loss(out, ref)
            else:
                t = self.temperature
                kd = F.kl_div(F.log_softmax(out / t, dim=-1), F.softmax(ref / t, dim=-1), reduction="batchmean") * t * t
            terms.append(alpha * kd)
        return sum(terms)


def split_holdout(data: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, held-out): a seeded random ``fraction`` of the samples held out."""
    n = data.num_samples
    order = np.random.default_rng(seed + 1).permutation(n)
    k = max(1, int(round(n * fraction)))
    held, kept = np.sort(order[:k]), np.sort(order[k:])
    pick = lambda idx: ArrayDataset({name: a[idx] for name, a in data.arrays.items()},  # noqa: E731
                                    None if data.labels is None else np.asarray(data.labels)[idx], data.source)
    return pick(kept), pick(held)


def _rounded(row: Mapping[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


def _scheduler(opt, schedule: str, epochs: int):
    import torch

    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, (2 * epochs) // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def evaluate_top1(module, data: ArrayDataset, batch_size: int = 256) -> float:
    """Top-1 of the module's first output on ``data`` (eval mode, no gradients)."""
    return evaluate(module, data, batch_size)[0]


def evaluate(module, data: ArrayDataset, batch_size: int = 256, loss: str = "cross-entropy") -> tuple[float, float]:
    """(top-1, mean loss) of the module's first output on ``data`` (eval mode, no gradients)."""
    import torch
    import torch.nn.functional as F

    module.eval()
    correct, total = 0, 0.0
    with torch.no_grad():
        for feed, labels in _batches(data, batch_size):
            out = module(**{k: torch.from_numpy(v) for k, v in feed.items()})[0]
            target = torch.from_numpy(np.asarray(labels))
            if loss == "cross-entropy":
                correct += int((out.argmax(dim=-1).numpy() == labels).sum())
                total += float(F.cross_entropy(out, target.long(), reduction="sum"))
            else:
                total += float(F.mse_loss(out, target.to(out.dtype), reduction="sum")) / max(1, out[0].numel())
    return correct / data.num_samples, total / data.num_samples


def _batches(data: ArrayDataset, batch_size: int):
    n = data.num_samples
    for i in range(0, n, batch_size):
        yield ({k: np.ascontiguousarray(v[i : i + batch_size]) for k, v in data.arrays.items()},
               np.asarray(data.labels)[i : i + batch_size])


def _teacher_logits(model: ir.Model, data: ArrayDataset, batch_size: int) -> np.ndarray:
    """The float model's first output on ``data``: annotations ignored, and the float weights a
    rewrite (GPFQ, an earlier fine-tune) replaced restored, so the teacher is never the quantized
    model the student starts from."""
    from qcompiler.api import first_output
    from qcompiler.runtime import Runner

    return first_output(Runner(float_reference.float_model(model)), data, max(batch_size, 256)).astype(np.float32)


def _check_label_shape(module, data: ArrayDataset, loss: str) -> None:
    """Labels must match the first output: one class index per sample (cross-entropy) or the
    output's shape (mse)."""
    import torch

    if data.labels is None:
        return
    labels = np.asarray(data.labels)
    feed = {k: torch.from_numpy(np.ascontiguousarray(v[:2])) for k, v in data.arrays.items()}
    with torch.no_grad():
        out = module(**feed)[0]
    if loss == "cross-entropy":
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"fine-tune labels must be 1-D class indices for cross-entropy, got {labels.dtype}{list(labels.shape)}")
        if out.dim() != 2 or labels.min() < 0 or labels.max() >= out.shape[1]:
            raise DataError(f"fine-tune labels span [{labels.min()}, {labels.max()}] but the model's first output has shape "
                            f"{list(out.shape)} (expected (batch, classes))")
    elif labels.shape[1:] != tuple(out.shape[1:]):
        raise DataError(f"fine-tune targets have shape {list(labels.shape)}, the model's first output {list(out.shape)}")


def _write_back(model: ir.Model, module) -> None:
    """Trained weights into the IR, on their grids (the codes a target will emit)."""
    import torch

    values = values_by_name(model.graph)
    for name, book in module.codebooks().items():
        ann.set(values[name], book)
    with torch.no_grad():
        for name in module.parameter_names():
            weight = module.quantized_weight(name).detach().cpu().numpy()
            value = values[name]
            float_reference.remember(value)  # the distillation teacher of a later fine-tune
            set_initializer(model.graph, value, weight.astype(np.float32))
            grid = ann.get(value, ann.WeightGrid)
            if grid is not None and ann.get(value, ann.FixedPoint) is None:
                # the codes now come from training: the target keeps them (and its grid's shift)
                ann.set(value, ann.IntegerWeights(bits=grid.bits, q_min=grid.q_min, q_max=grid.q_max, scales=grid.scales,
                                                  axis=grid.axis, method="finetune", grid=grid.target))


def write_into_module(model: ir.Model, module) -> None:
    """Write the IR's quantizable-layer weights into the ``torch.nn.Module`` it was lowered from.

    Parameters are matched by name (the lowering keeps ``state_dict`` keys as initializer names)
    and shape (a 2-D weight stored transposed is transposed back). A layer with a folded
    BatchNormalization (:class:`~qcompiler.annotations.FoldedBatchNorm`) gets the folded weight
    and bias, and its BatchNormalization becomes the identity (γ = 1, β = 0 or the bias when the
    layer has none, mean 0, variance 1 − ε): the module then computes the fine-tuned network,
    and lowering it again gives the same weights.

    Raises:
        QCompilerError: a weight with no parameter of that name and shape in the module.
    """
    import torch

    from qcompiler.passes.detect_layers import quantizable_nodes

    state = module.state_dict(keep_vars=False)
    values = values_by_name(model.graph)

    def put(key: str, array: np.ndarray) -> None:
        target = state.get(key)
        if target is None:
            raise QCompilerError(f"fine-tune: the module has no parameter or buffer {key!r} to write the trained weights into")
        if tuple(target.shape) != array.shape and array.ndim == 2 and tuple(target.shape) == array.T.shape:
            array = array.T
        if tuple(target.shape) != array.shape:
            raise QCompilerError(f"fine-tune: module parameter {key!r} has shape {tuple(target.shape)}, the trained weight {array.shape}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(target.dtype))

    for node, layer in quantizable_nodes(model):
        weight = const_array(values[layer.weight])
        bias = const_array(values[layer.bias]) if layer.bias else None
        folded = ann.get(node, ann.FoldedBatchNorm)
        if folded is None:
            put(layer.weight, weight)
            if bias is not None and layer.bias in state:
                put(layer.bias, bias)
            continue
        put(folded.weight, weight)
        put(folded.scale, np.ones_like(bias))
        put(folded.mean, np.zeros_like(bias))
        put(folded.var, np.full_like(bias, 1.0 - folded.epsilon))
        if folded.bias is not None and folded.bias in state:  # (the exporter gives bias-free layers a zero constant)
            put(folded.bias, bias)
            put(folded.shift, np.zeros_like(bias))
        else:
            put(folded.shift, bias)
