"""``FlowMatchSDEScheduler``: the stock flow-matching Euler scheduler with the Flow-GRPO SDE step.

Same timesteps/sigmas as ``FlowMatchEulerDiscreteScheduler`` (shift, dynamic shifting, ...), but
``step`` takes one step of the SDE of ``flowalign.sampling.sde_step`` (same marginals as the flow
ODE; ``noise_level = 0`` is exactly Euler). Any stock flow pipeline can use it, e.g.::

    pipe.scheduler = FlowMatchSDEScheduler.from_scheduler(
        pipe.scheduler, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    image = pipe(prompt).images[0]

The log-probability of every transition is kept in ``last_log_prob`` (not accumulated). For a compiled
step set ``compiled_step = flowalign.compile.compile_sde_step()`` (what ``RLGStableDiffusion3Pipeline.enable_compile``
does): the same numbers from one graph per run, the noise still drawn from ``generator``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from flowalign.sampling import sde_step

__all__ = ["FlowMatchSDEScheduler"]


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching scheduler whose ``step`` is the Flow-GRPO SDE step (``noise_level`` = its ``a``).

    Takes every argument of ``FlowMatchEulerDiscreteScheduler`` plus ``noise_level`` (default 0.7),
    which is part of the config: ``save_pretrained`` / ``from_pretrained`` / ``from_config`` keep it.

    Attributes:
        generator: torch generator(s) for the Gaussian noise of each step (``None``: global RNG).
        noise_copies: the batch is this many copies of the same images (an RLG sweep): one Gaussian draw
            per image, shared by its copies, so each copy sees the noise a single run would (default 1).
        last_log_prob: ``[B]`` log p(x_next | x) of the last step (float32).
        compiled_step: ``None`` (eager ``sde_step``) or a function with ``sde_step``'s signature that runs it
            compiled (``flowalign.compile.compile_sde_step()``); sigmas enter it as tensors, so the steps of a
            run share one graph.

    Example::

        sde = FlowMatchSDEScheduler(shift=3.0, noise_level=0.5)
        sde.save_pretrained("out/scheduler")
        assert FlowMatchSDEScheduler.from_pretrained("out/scheduler").config.noise_level == 0.5
    """

    generator: torch.Generator | list[torch.Generator] | None = None
    noise_copies: int = 1
    last_log_prob: torch.Tensor | None = None
    compiled_step: Callable | None = None

    def __init__(self, *args, noise_level: float = 0.7, **kwargs):
        super().__init__(*args, **kwargs)  # the parent's @register_to_config records its own arguments
        self.register_to_config(noise_level=check_noise_level(noise_level))

    @property
    def noise_level(self) -> float:
        return float(self.config.noise_level)

    @noise_level.setter
    def noise_level(self, value: float) -> None:
        self.register_to_config(noise_level=check_noise_level(value))

    @classmethod
    def from_scheduler(
        cls,
        scheduler: FlowMatchEulerDiscreteScheduler,
        noise_level: float = 0.7,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> FlowMatchSDEScheduler:
        """A new SDE scheduler with the timestep grid settings (``config``) of ``scheduler``."""
        config = {k: v for k, v in scheduler.config.items() if k != "noise_level"}
        sde = cls.from_config(config, noise_level=noise_level)
        sde.generator = generator
        sde.compiled_step = getattr(scheduler, "compiled_step", None)
        return sde

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sigma_next = self.sigmas[self.step_index + 1]
        generator = generator if generator is not None else self.generator
        noise = None
        copies = int(self.noise_copies)
        if copies > 1 and self.noise_level > 0:
            if sample.shape[0] % copies:
                raise ValueError(f"noise_copies={copies} does not divide the batch of {sample.shape[0]} rows.")
            # z of each image drawn once (as a single run draws it), the same for all its copies
            shape = (sample.shape[0] // copies, *sample.shape[1:])
            z = randn_tensor(shape, generator=generator, device=sample.device, dtype=torch.float32)
            noise = torch.cat([z] * copies, dim=0)
        # x_next = mean + sigma_t * sqrt(-dt) * z  (flowalign.sampling.sde_step; a = 0 is the Euler step)
        step = self.compiled_step if self.compiled_step is not None else sde_step
        prev_sample, log_prob, _, _ = step(
            sample,
            model_output,
            sigma,
            sigma_next,
            noise_level=self.noise_level,
            generator=generator,
            noise=noise,
        )
        self.last_log_prob = log_prob
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def check_noise_level(value: float, name: str = "noise_level") -> float:
    """THE check of an SDE noise level ``a`` (the scheduler's and the RLG pipeline's ``sde_noise_level``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0 (Flow-GRPO uses 0.7; 0 is the ODE), got {value!r}.")
    return float(value)


# The config keys are read from the __init__ signature (ConfigMixin.from_config): the parent's arguments + noise_level.
_parent = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__)
FlowMatchSDEScheduler.__init__.__signature__ = _parent.replace(
    parameters=[
        *_parent.parameters.values(),
        inspect.Parameter("noise_level", inspect.Parameter.KEYWORD_ONLY, default=0.7, annotation=float),
    ]
)
del _parent
