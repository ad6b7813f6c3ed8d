"""Run-time counters: per model class, how many training calls took the fused path (and by
which route: ``engines.head_route``) and how many fell back to stock, by the guard's reason;
and how many times the fused op itself executed, per device type.

``fuses()`` counts its decisions in eager mode only (a Python side effect would break a
``torch.compile`` graph); the op counts its executions always (its body runs at run time even
in a compiled graph), so ``op_calls`` is the number to read in a compiled job.
``forward_rewrite.stats()`` returns a JSON-safe copy; ``audit()`` includes it.
"""

import threading

__all__ = [
    "record_decision",
    "record_dw_skipped",
    "record_op",
    "reset_stats",
    "stats",
]

_lock = threading.Lock()
#: "module.qualname" -> {"fused": n, "routes": {route: n}, "fallback": {reason: n}}
_classes: dict = {}
#: device type -> executions of the fused op's forward
_op_calls: dict = {}
#: executions that computed gradients but no weight gradient (a frozen head)
_dw_skipped = [0]


def class_key(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def record_decision(cls, route=None, reason=None) -> bool:
    """Counts one ``fuses()`` decision for model class ``cls``: fused by ``route``, or a
    fallback for ``reason``. Returns True the first time this class fuses by this route."""
    key = class_key(cls)
    with _lock:
        entry = _classes.setdefault(key, {"fused": 0, "routes": {}, "fallback": {}})
        if reason is None:
            entry["fused"] += 1
            first = route not in entry["routes"]
            entry["routes"][route] = entry["routes"].get(route, 0) + 1
            return first
        entry["fallback"][reason] = entry["fallback"].get(reason, 0) + 1
        return False


def record_op(device_type: str, dw_skipped: bool = False) -> None:
    """One execution of the fused op's forward on ``device_type``; ``dw_skipped``: it (or
    the backward it leaves) computes gradients but none for the frozen weight."""
    with _lock:
        _op_calls[device_type] = _op_calls.get(device_type, 0) + 1
        if dw_skipped:
            _dw_skipped[0] += 1


def record_dw_skipped() -> None:
    """A backward computation (reduction "none", float16) that skipped the weight gradient."""
    with _lock:
        _dw_skipped[0] += 1


def stats() -> dict:
    """A JSON-safe snapshot: ``{"classes": {"<module>.<Class>": {"fused": n, "routes":
    {route: n}, "fallback": {reason: n}}}, "op_calls": {device_type: n},
    "dw_skipped": n, "fused": n, "fallback": n}`` (the last two summed over classes;
    ``dw_skipped``: op executions with gradients but no weight gradient, a frozen head)."""
    with _lock:
        classes = {
            k: {
                "fused": v["fused"],
                "routes": dict(v["routes"]),
                "fallback": dict(v["fallback"]),
            }
            for k, v in sorted(_classes.items())
        }
        return {
            "classes": classes,
            "op_calls": dict(_op_calls),
            "dw_skipped": _dw_skipped[0],
            "fused": sum(v["fused"] for v in classes.values()),
            "fallback": sum(sum(v["fallback"].values()) for v in classes.values()),
        }


def for_class(module: str, qualname: str):
    """The counters of one class (the audit's per-class ``calls``), or None."""
    with _lock:
        v = _classes.get(f"{module}.{qualname}")
        if v is None:
            return None
        return {
            "fused": v["fused"],
            "routes": dict(v["routes"]),
            "fallback": dict(v["fallback"]),
        }


def reset_stats() -> None:
    """Zeroes every counter (the one-time log lines are not repeated)."""
    with _lock:
        _classes.clear()
        _op_calls.clear()
        _dw_skipped[0] = 0
