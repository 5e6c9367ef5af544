"""What hf-less prints while it works: one-line messages and an examples/s bar for training."""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)




def examples_progress(desc: str, disable: bool = False):
    """A Trainer callback drawing one tqdm bar counted in examples (so it shows examples per second).

    Replaces the Trainer's own bar, which counts optimizer steps.
    """
    from transformers import TrainerCallback

    class ExamplesProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            self.per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
            epochs = max(1, math.ceil(args.num_train_epochs))
            n = len(train_dataloader.dataset) if hasattr(train_dataloader, "dataset") else None
            # An epoch's last optimizer step takes what is left of the epoch, not a full batch.
            self.n = n if n is not None else state.max_steps * self.per_step // epochs
            self.steps_per_epoch = max(1, math.ceil(self.n / self.per_step))
            self.bar = tqdm(total=self.n * epochs, desc=desc, unit="ex",
                            disable=disable or not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                last = (state.global_step - 1) % self.steps_per_epoch == self.steps_per_epoch - 1
                step = self.n - self.per_step * (self.steps_per_epoch - 1) if last else self.per_step
                self.bar.update(max(0, min(step, self.bar.total - self.bar.n)))

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return ExamplesProgress()




def _library_bars_off() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

