"""Zeroth-order tuning of one scalar so that a black-box metric hits a target (ECO's strength).

ECO wants the corruption strength x at which the forget metric m(x) equals a target t, i.e. the
minimum of F(x) = (m(x) - t)^2 / 2. m has no usable gradient (the corruption count is discrete, the
metric a black-box evaluation), so each iteration takes the two-point estimate
    g = [m(x + e) - m(x - e)] / 2e
and makes a Gauss-Newton step on F, x <- x - (m(x) - t) / g, with m(x) estimated by the two
points' mean, inside a trust region. e shrinks with the step (never below `min_eps`, the
resolution of m). Compared with plain ZO gradient descent on F this needs no learning rate (the
metric's scale differs per model and request) and converges in a handful of evaluations, which
matters at a few seconds per evaluation on CPU. The point returned is the best one *evaluated*.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class ZOResult:
    x: float  # best evaluated point
    fx: float  # |m(x) - target| there
    value: float  # m(x) there
    evaluations: int
    history: list[dict] = field(default_factory=list)  # one row per iteration
    final: tuple[float, float] | None = None  # (x, m(x)) of the last prediction, when evaluated


def two_point_gradient(
    m: Callable[[float], float], x: float, e: float, lo: float, hi: float
) -> tuple[float, float, float, float, float]:
    """g = [m(x+e) - m(x-e)] / (x+e - (x-e)), the points clipped to [lo, hi]; also returns them."""
    xp, xm = min(x + e, hi), max(x - e, lo)
    mp, mm = m(xp), m(xm)
    return (mp - mm) / (xp - xm) if xp > xm else 0.0, xp, mp, xm, mm


def zo_solve(
    m: Callable[[float], float],
    target: float,
    x0: float,
    lo: float,
    hi: float,
    eps: float,
    iterations: int,
    max_step: float,
    min_eps: float = 0.0,
    tol: float = 0.0,
    progress: bool = False,
    desc: str = "zo",
) -> ZOResult:
    """Find x in [lo, hi] with m(x) ~= target using 2 evaluations of m per iteration (plus one
    of the final prediction).

    `max_step` bounds each move (halved whenever the residual changes sign, i.e. we stepped
    over the solution); `tol` stops early once an evaluated |m - target| is that small. If the
    estimated slope is zero (flat or noisy m), the step goes `max_step` in the direction that
    would help a decreasing m, the case ECO's metric is in."""
    x, radius = min(max(x0, lo), hi), max_step
    e = eps
    best = (float("inf"), x, float("nan"))
    evaluations, history, prev_residual = 0, [], 0.0
    bar = tqdm(range(iterations), desc=desc, disable=not progress, leave=False)
    for it in bar:
        g, xp, mp, xm, mm = two_point_gradient(m, x, e, lo, hi)
        evaluations += 2
        for xe, me in ((xp, mp), (xm, mm)):
            if abs(me - target) < best[0]:
                best = (abs(me - target), xe, me)
        residual = (mp + mm) / 2 - target
        if prev_residual and residual * prev_residual < 0:
            radius /= 2
        prev_residual = residual
        if g != 0.0:
            step = -residual / g
        else:
            step = radius if residual > 0 else -radius
        step = max(-radius, min(radius, step))
        x = min(max(x + step, lo), hi)
        history.append(
            {
                "iteration": it,
                "x_plus": xp,
                "m_plus": mp,
                "x_minus": xm,
                "m_minus": mm,
                "grad": g,
                "residual": residual,
                "step": step,
                "next_x": x,
            }
        )
        bar.set_postfix(x=f"{x:.4g}", best=f"{best[0]:.4g}")
        if best[0] <= tol:
            break
        e = max(min(e, abs(step) / 2), min_eps)
    final = None
    if history and best[0] > tol:  # the last Gauss-Newton prediction itself has not been evaluated yet
        value = m(x)
        evaluations += 1
        final = (x, value)
        if abs(value - target) < best[0]:
            best = (abs(value - target), x, value)
    log.info("zo: best |m - target| = %.4g at x = %.4g after %d evaluations", best[0], best[1], evaluations)
    return ZOResult(x=best[1], fx=best[0], value=best[2], evaluations=evaluations, history=history, final=final)
