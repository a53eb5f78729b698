"""Optuna TPE through Ray Tune, told the truth about trials ASHA stopped early.

Ray's OptunaSearch tells Optuna that a trial stopped early by ASHA is COMPLETE
with its early score, which biases TPE toward configurations that start fast
rather than end well. This subclass tells Optuna such trials were PRUNED:
Optuna's TPE then ranks every pruned trial below every completed one (pruned
ones among themselves by how far they got, then by their last score), so the
sampler still learns from them without mistaking them for finished results.
Diverged trials (a NaN loss) are told FAIL.

Defined at module level so that Ray can pickle it with the experiment state.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from weakseg import compat

logger = logging.getLogger(__name__)


class EarlyStopAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, full_iterations: int, **kw: Any):
        super().__init__(*args, **kw)
        self.full_iterations = full_iterations

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("diverged"):
            return  # its NaN placeholder is no intermediate value
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = compat.optuna_trial(self, trial_id)
        if trial_id in compat.completed_trials(self) or ot_trial is None:
            return super().on_trial_complete(trial_id, result, error)
        state = None
        if not error and result is not None:
            if result.get("diverged"):
                state = TrialState.FAIL
            elif int(result.get("iteration", self.full_iterations)) < self.full_iterations:
                state = TrialState.PRUNED
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        try:
            compat.optuna_study(self).tell(ot_trial, state=state)
        except Exception as e:  # as Ray's OptunaSearch does: a bookkeeping error must not end the search
            # e.g. Optuna's GridSampler calls study.stop() once every grid point has been handed out,
            # and stop() raises outside study.optimize(), after the trial's state has been stored
            logger.warning("Optuna could not record trial %s as %s: %s", trial_id, state.name, e)
        compat.completed_trials(self).add(trial_id)



class ResizedSearchGenerator(SearchGenerator):
    """Ray's search generator with a new trial budget that survives its own state restore."""

    def __init__(self, searcher: Any, samples: int):
        super().__init__(searcher)
        self.samples = samples

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        compat.set_search_budget(self, self.samples)


def resize_restored_search(tuner: Any, samples: int) -> None:
    """`--resume --apply-safe-changes` with more samples: Ray restores the trial budget from its saved search
    state, so the restored search algorithm is wrapped in a generator that overrides it after restoring."""
    tune_config = compat.restored_tune_config(tuner)
    search_alg = tune_config.search_alg
    if isinstance(search_alg, SearchGenerator):
        search_alg = search_alg.searcher
    tune_config.search_alg = ResizedSearchGenerator(search_alg, samples)
