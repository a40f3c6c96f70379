"""Experiments: comparisons of methods at equal training compute or steps, resumable across
sessions. The top layer of the package (it trains, evaluates and reports).

- :mod:`cm_policy.experiments.campaign`: plans (YAML under ``eval/plans/``), the runner behind
  ``cm-policy campaign PLAN``, and its report;
- :mod:`cm_policy.experiments.measure`: the measurement primitives (step costs side by side,
  gradient statistics, latency per chunk, cached evaluations, pooled intervals).
"""
