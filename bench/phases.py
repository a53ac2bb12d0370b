"""The phases of one training step, timed from hooks (no change to the step's code): the vision tower's and the
language model's forwards (forward hooks), the losses (from the last gradient-free forward to the first forward
with gradients: GradCache's estimator and contrastive stages), the backward (from each forward with gradients to
the next one or the optimizer; gradient clipping included), the optimizer step (its hooks), and the rest of the
step from its first forward to the optimizer's end (multimodal position ids, the embedding merge, pooling). On a GPU the
marks are CUDA events (the step is not synchronised inside); on a CPU, wall-clock marks.

PDF runs its N paths through the language model in one batched call, so "per path" is that call's time / N.
"""

from __future__ import annotations

import time

import torch

from pdfkernels.models.anatomy import decoder_stack, hf_model, inner_model


class PhaseTimer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_paths: int):
        self.cuda = torch.cuda.is_available()
        self.num_paths, self.marks, self.handles = num_paths, [], []
        inner = inner_model(model)
        vision = None if inner is None else (getattr(inner, "visual", None) or getattr(inner, "vision_tower", None))
        modules = {"language model": decoder_stack(hf_model(model))}
        if vision is not None:
            modules["vision tower"] = vision
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._mark(name, "start")))
            self.handles.append(module.register_forward_hook(self._mark(name, "end")))
        self.handles.append(optimizer.register_step_pre_hook(self._mark("optimizer", "start")))
        self.handles.append(optimizer.register_step_post_hook(self._mark("optimizer", "end")))

    @property
    def timer(self) -> str:
        return "CUDA events" if self.cuda else "wall clock (CPU)"

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _mark(self, name: str, edge: str):
        def hook(*_):
            self.marks.append((name, edge, torch.is_grad_enabled(), self._now()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)

    def phases(self) -> dict[str, float]:
        """Milliseconds per phase of the step(s) marked since the last call; the marks are then cleared."""
        if self.cuda:
            torch.cuda.synchronize()
        marks, self.marks = self.marks, []
        out = {"vision tower fwd": 0.0, "language model fwd": 0.0}
        opened: dict[str, object] = {}
        for name, edge, _, t in marks:
            if name == "optimizer":
                continue
            if edge == "start":
                opened[name] = t
            else:
                out[f"{name} fwd"] += self._ms(opened.pop(name), t)
        out["language model fwd per path"] = out["language model fwd"] / self.num_paths
        starts_with_grad = [i for i, (n, e, g, _) in enumerate(marks) if e == "start" and g and n != "optimizer"]
        last_free_end = max(i for i, (n, e, g, _) in enumerate(marks) if e == "end" and not g and n != "optimizer")
        optimizer = [i for i, (n, _, _, _) in enumerate(marks) if n == "optimizer"]
        out["losses (estimator + contrastive + MIM)"] = self._ms(marks[last_free_end][3], marks[starts_with_grad[0]][3])
        ends_with_grad = [i for i, (n, e, g, _) in enumerate(marks)
                          if e == "end" and g and n == "language model"]
        backward = 0.0
        for i in ends_with_grad:
            following = [j for j in starts_with_grad + optimizer[:1] if j > i]
            backward += self._ms(marks[i][3], marks[min(following)][3])
        out["backward (+ grad clip)"] = backward
        out["optimizer"] = self._ms(marks[optimizer[0]][3], marks[optimizer[1]][3])
        out["step"] = self._ms(marks[0][3], marks[optimizer[1]][3])
        timed = ("vision tower fwd", "language model fwd", "losses (estimator + contrastive + MIM)",
                 "backward (+ grad clip)", "optimizer")
        out["other (position ids, embedding merge, pooling)"] = out["step"] - sum(out[k] for k in timed)
        return out
