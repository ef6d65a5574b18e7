"""``push_to_hub`` in a training config: the hook that publishes the run while it trains."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel.runtime.checkpoints import EXPORT_SUBDIR
from seg_accel.engine.hooks import Hook
from seg_accel.runtime.workdir import EVAL_RESULTS, STAGING
from seg_accel.hub.push import HubPusher, stage_push
from seg_accel.registry import HOOKS

if TYPE_CHECKING:
    from seg_accel.config.schema import PushToHubConfig
    from seg_accel.engine.runner import Runner

logger = logging.getLogger("seg_accel")


@HOOKS.register()
class PushToHubHook(Hook):
    """Pushes what the run saves, on the main process; uploads run in a background thread.

    It listens to the checkpointer (a checkpoint or a new best was saved) and to the exporter
    (the final export was written). A push is staged (its files copied) at the end of the
    iteration that saved it, so it also holds that iteration's evaluation and log lines; the
    final push, when ``final/`` is written.
    """

    priority = 95

    def __init__(self, cfg: PushToHubConfig):
        self.cfg = cfg
        self.pusher: HubPusher | None = None
        self.pending: list[tuple[str, Path, str]] = []  # (name, export folder, commit message) to stage
        self.latest_best: tuple[str, float, str] | None = None  # (checkpoint name, score, metric) saved last
        self.best_dir: str | None = None  # the best checkpoint pushed last
        self.best_evaluation: dict | None = None
        self.runner: Runner | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best_dir": self.best_dir, "best_evaluation": self.best_evaluation,
                "latest_best": list(self.latest_best) if self.latest_best else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_dir, self.best_evaluation = state["best_dir"], state["best_evaluation"]
        self.latest_best = tuple(state["latest_best"]) if state.get("latest_best") else None

    def _message(self, name: str, default: str) -> str:
        template, runner = self.cfg.commit_message, self.runner
        return template.format(name=name, iter=runner.iter, epoch=runner.epoch) if template else default

    def _latest_evaluation(self) -> dict | None:
        file = self.runner.work_dir / EVAL_RESULTS
        return json.loads(file.read_text()) if file.is_file() else None

    def _submit(self, name: str, export_dir: Path, evaluation: dict | None, message: str) -> None:
        """Copy the export and the run's files into a staging folder now (the checkpoint may be
        rotated away before the upload runs) and queue the push."""
        runner = self.runner
        folder = stage_push(runner.work_dir / STAGING / f"{name}.push", self.cfg.repo_id, export_dir,
                            runner.work_dir, evaluation, runner.run_info())
        self.pusher.submit(name, folder, message)

    # -- events ---------------------------------------------------------------------------
    def on_checkpoint(self, name: str, path: Path, info: dict[str, Any]) -> None:
        if info.get("kind") == "best":
            self.latest_best = (name, float(info["score"]), str(info["metric"]))
            if self.cfg.strategy == "best":
                self.pending.append((name, path / EXPORT_SUBDIR, ""))
        elif self.cfg.strategy == "checkpoint" and (path / EXPORT_SUBDIR).is_dir():
            self.pending.append((name, path / EXPORT_SUBDIR, self._message(name, f"seg-accel: checkpoint {name}")))

    def on_final_export(self, folder: Path) -> None:
        self._stage_pending()
        if self.cfg.strategy == "best" and self.latest_best is not None:
            name = self.latest_best[0]
            export = self.runner.checkpoint_dir / name / EXPORT_SUBDIR
            if name != self.best_dir:
                self._push_best(name, export)
            else:  # the best model is on the Hub: bring its card's logs up to date
                self._submit("final", export, self.best_evaluation,
                             self._message("final", f"seg-accel: training finished; best is {name}"))
        else:
            self._submit("final", folder, self._latest_evaluation(),
                         self._message("final", f"seg-accel: final model (iteration {self.runner.iter})"))
        self._close()

    def _push_best(self, name: str, export: Path) -> None:
        _, score, metric = self.latest_best
        self.best_dir = name
        self.best_evaluation = self._latest_evaluation()  # the evaluation that made it the best
        self._submit(name, export, self.best_evaluation,
                     self._message(name, f"seg-accel: new best {metric} {score:.2f} ({name})"))

    def _stage_pending(self) -> None:
        pending, self.pending = self.pending, []
        for name, export, message in pending:
            if self.cfg.strategy == "best":
                if name == self.latest_best[0]:  # only the newest best of the iteration
                    self._push_best(name, export)
            else:
                self._submit(name, export, self._latest_evaluation(), message)

    def _close(self) -> None:
        if self.pusher is None:
            return
        self.pusher.close()
        failed = f"; failed: {', '.join(self.pusher.failed)}" if self.pusher.failed else ""
        logger.info("hub: %d push(es) to %s done%s", len(self.pusher.pushed), self.cfg.repo_id, failed)
        shutil.rmtree(self.runner.work_dir / STAGING, ignore_errors=True)
        self.pusher = None

    # -- hook points ----------------------------------------------------------------------
    def before_run(self, runner: Runner) -> None:
        if not runner.accelerator.is_main_process:
            return
        self.runner = runner
        runner.checkpointer.on_saved.append(self.on_checkpoint)
        runner.exporter.on_final.append(self.on_final_export)
        shutil.rmtree(runner.work_dir / STAGING, ignore_errors=True)  # left by an interrupted run
        self.pusher = HubPusher(self.cfg.repo_id, self.cfg.private, self.cfg.revision, self.cfg.retries,
                                self.cfg.retry_wait, self.cfg.max_waiting)
        logger.info("hub: strategy %s, pushing to %s in the background", self.cfg.strategy, self.cfg.repo_id)

    def after_train_iter(self, runner: Runner) -> None:
        if self.pusher is not None:
            self._stage_pending()

    def after_train_epoch(self, runner: Runner) -> None:
        if self.pusher is not None:
            self._stage_pending()

    def after_run(self, runner: Runner) -> None:
        self._close()  # when no final export was written (it closes the pusher itself)
