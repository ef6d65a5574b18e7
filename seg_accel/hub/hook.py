"""``push_to_hub`` in a training config: the hook that publishes the run while it trains."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel.engine.hooks import CheckpointHook, EvalHook, Hook
from seg_accel.engine.trainer import EVAL_RESULTS, FINAL_DIR
from seg_accel.hub.push import HubPusher, stage_push

if TYPE_CHECKING:
    from seg_accel.config.schema import PushToHubConfig
    from seg_accel.engine.trainer import Trainer

logger = logging.getLogger("seg_accel")

STAGING = ".hub_staging"


class PushToHubHook(Hook):
    """Stages and queues pushes on the main process; uploads run in a background thread.

    Runs after the checkpoint, evaluation, final-export and logger hooks of the same
    point, so a push holds this iteration's checkpoint, evaluation and log lines.
    """

    priority = 95

    def __init__(self, cfg: PushToHubConfig):
        self.cfg = cfg
        self.pusher: HubPusher | None = None
        self.pushed_iter: int | None = None
        self.best_dir: str | None = None  # the best checkpoint pushed last
        self.best_evaluation: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_dir": self.best_dir, "best_evaluation": self.best_evaluation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_dir, self.best_evaluation = state["best_dir"], state["best_evaluation"]

    def _message(self, name: str, runner: Trainer, default: str) -> str:
        template = self.cfg.commit_message
        return template.format(name=name, iter=runner.iter, epoch=runner.epoch) if template else default

    def _submit(self, runner: Trainer, name: str, export_dir: Path, evaluation: dict | None, message: str) -> None:
        """Copy the export and the run's files into a staging folder now (the checkpoint may be
        rotated away before the upload runs) and queue the push."""
        folder = stage_push(runner.work_dir / STAGING / f"{name}.push", self.cfg.repo_id, export_dir,
                            runner.work_dir, evaluation, runner.run_info())
        self.pusher.submit(name, folder, message)

    @staticmethod
    def _latest_evaluation(runner: Trainer) -> dict | None:
        file = runner.work_dir / EVAL_RESULTS
        return json.loads(file.read_text()) if file.is_file() else None

    # -- hook points ----------------------------------------------------------------
    def before_run(self, runner: Trainer) -> None:
        if not runner.accelerator.is_main_process:
            return
        shutil.rmtree(runner.work_dir / STAGING, ignore_errors=True)  # left by an interrupted run
        self.pusher = HubPusher(self.cfg.repo_id, self.cfg.private, self.cfg.revision, self.cfg.retries,
                                self.cfg.retry_wait, self.cfg.max_waiting)
        logger.info("hub: strategy %s, pushing to %s in the background", self.cfg.strategy, self.cfg.repo_id)

    def _after_step(self, runner: Trainer) -> None:
        if not runner.accelerator.is_main_process or runner.iter == self.pushed_iter:
            return
        if self.cfg.strategy == "checkpoint":
            saver = next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)
            if saver is not None and saver.last_saved == runner.iter:
                name = f"epoch_{runner.epoch + 1}" if saver.cfg.by_epoch else f"iter_{runner.iter}"
                self.pushed_iter = runner.iter
                # CheckpointHook exported it into the checkpoint (with every process: a sharded
                # model is gathered there)
                self._submit(runner, name, runner.checkpoint_dir / name / "pretrained", self._latest_evaluation(runner),
                             self._message(name, runner, f"seg-accel: checkpoint {name}"))
        elif self.cfg.strategy == "best":
            evaluator = next((h for h in runner.hooks if isinstance(h, EvalHook)), None)
            if evaluator is not None and evaluator.best_dir and evaluator.best_dir != self.best_dir:
                self._push_best(runner, evaluator)

    def _push_best(self, runner: Trainer, evaluator: EvalHook) -> None:
        self.best_dir, self.pushed_iter = evaluator.best_dir, runner.iter
        self.best_evaluation = self._latest_evaluation(runner)  # the evaluation that made it the best
        export = runner.checkpoint_dir / evaluator.best_dir / "pretrained"
        self._submit(runner, evaluator.best_dir, export, self.best_evaluation,
                     self._message(evaluator.best_dir, runner,
                                   f"seg-accel: new best {evaluator.key} {evaluator.best_score:.2f} "
                                   f"({evaluator.best_dir})"))

    def after_train_iter(self, runner: Trainer) -> None:
        self._after_step(runner)

    def after_train_epoch(self, runner: Trainer) -> None:
        self._after_step(runner)

    def after_run(self, runner: Trainer) -> None:
        if not runner.accelerator.is_main_process:
            return
        evaluator = next((h for h in runner.hooks if isinstance(h, EvalHook)), None)
        if self.cfg.strategy == "best" and evaluator is not None and evaluator.best_dir:
            if evaluator.best_dir != self.best_dir:
                self._push_best(runner, evaluator)
            else:  # the best model is on the Hub: bring its card's logs up to date
                export = runner.checkpoint_dir / evaluator.best_dir / "pretrained"
                self._submit(runner, "final", export, self.best_evaluation,
                             self._message("final", runner, f"seg-accel: training finished; best is "
                                                            f"{evaluator.best_dir}"))
        else:
            self._submit(runner, "final", runner.work_dir / FINAL_DIR, self._latest_evaluation(runner),
                         self._message("final", runner, f"seg-accel: final model (iteration {runner.iter})"))
        self.pusher.close()
        failed = f"; failed: {', '.join(self.pusher.failed)}" if self.pusher.failed else ""
        logger.info("hub: %d push(es) to %s done%s", len(self.pusher.pushed), self.cfg.repo_id, failed)
        shutil.rmtree(runner.work_dir / STAGING, ignore_errors=True)
