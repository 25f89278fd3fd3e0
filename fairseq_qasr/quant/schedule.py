"""QAT schedules, a recipe's ``schedule`` section:

```yaml
schedule:
  observe_updates: 200          # observers refine ranges during the first 200 updates, then freeze
  scale_warmup_updates: 100     # learnable scales (LSQ/LSQ+/PACT) get no updates during the first 100
  weight_bits: [[0, 8], [300, 4], [600, 2]]   # progressive bit lowering: weight bits from each update on
```
"""
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Tuple

from torch import nn

from .modules import QModule

_KEYS = {"observe_updates", "scale_warmup_updates", "weight_bits"}
_VALID_BITS = set(range(1, 9)) | {16}


class ScheduleError(ValueError):
    """Invalid schedule section; the message names the source and the field."""


@dataclass
class Schedule:
    observe_updates: int = 0
    scale_warmup_updates: int = 0
    weight_bits: List[Tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Schedule":
        if not isinstance(d, Mapping):
            raise ScheduleError(f"{source}: schedule must be a mapping")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise ScheduleError(f"{source}: schedule: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        ints = {}
        for key in ("observe_updates", "scale_warmup_updates"):
            value = d.get(key, 0)
            if not isinstance(value, int) or value < 0:
                raise ScheduleError(f"{source}: schedule.{key}: expected an integer >= 0, got {value!r}")
            ints[key] = value
        phases = []
        for item in d.get("weight_bits") or []:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) for v in item)):
                raise ScheduleError(f"{source}: schedule.weight_bits: each phase is [update, bits], got {item!r}")
            if item[1] not in _VALID_BITS:
                raise ScheduleError(f"{source}: schedule.weight_bits: bits {item[1]} not in 1..8 or 16")
            phases.append((int(item[0]), int(item[1])))
        if [p[0] for p in phases] != sorted({p[0] for p in phases}):
            raise ScheduleError(f"{source}: schedule.weight_bits: phase updates must increase strictly")
        if phases and phases[0][0] != 0:
            raise ScheduleError(f"{source}: schedule.weight_bits: the first phase must start at update 0")
        return cls(ints["observe_updates"], ints["scale_warmup_updates"], phases)

    def to_dict(self) -> dict:
        return {"observe_updates": self.observe_updates, "scale_warmup_updates": self.scale_warmup_updates,
                "weight_bits": [list(p) for p in self.weight_bits]}

    def weight_bits_at(self, update: int) -> int:
        bits = 0
        for start, b in self.weight_bits:
            if update >= start:
                bits = b
        return bits

    # -- hooks around one training update --------------------------------------------------------
    def before_update(self, model: nn.Module, update: int) -> List[str]:
        """Set observers and weight bits for ``update``; returns what changed (for the log)."""
        events = []
        observing = update < self.observe_updates
        for _, q in activation_quantizers(model):
            q.observing = observing
        bits = self.weight_bits_at(update)
        changed = 0
        for module, name, q in weight_quantizers(model):
            if bits and q.spec.bits != bits:
                q.set_bits(bits)
                changed += 1
                refit = True
            else:  # weights are always at hand: fit them while observing, and whenever they have no range
                refit = observing or not bool(q.initialized)
            if refit:
                q.initialized.fill_(False)
                q.observe(getattr(module, name).detach())  # the current weights' range on the current grid
        if changed:
            events.append(f"weight bits -> {bits} ({changed} quantizers)")
        return events

    def after_backward(self, model: nn.Module, update: int) -> None:
        """During the scale warm-up, learnable quantizer parameters keep their initial values."""
        if update >= self.scale_warmup_updates:
            return
        from .replace import quantizers  # replace -> recipe -> schedule: import at call time

        for _, q in quantizers(model):
            for p in q.parameters(recurse=False):
                p.grad = None


def weight_quantizers(model: nn.Module):
    """(module, parameter name, quantizer) of every quantized weight (biases are int32, not scheduled)."""
    for m in model.modules():
        if isinstance(m, QModule):
            for name, q in m.w_q.items():
                if getattr(m, name, None) is not None:
                    yield m, name, q


def activation_quantizers(model: nn.Module):
    from .replace import quantizers  # replace -> recipe -> schedule: import at call time

    weights = {id(q) for _, _, q in weight_quantizers(model)}
    return ((n, q) for n, q in quantizers(model) if id(q) not in weights)
