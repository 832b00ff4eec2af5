"""``FlowMatchSDEScheduler``: the stock flow-matching Euler scheduler with the Flow-GRPO SDE step.

Same timesteps/sigmas as ``FlowMatchEulerDiscreteScheduler`` (shift, dynamic shifting, ...), but
``step`` takes one step of the SDE of ``flowalign.sampling.sde_step`` (same marginals as the flow
ODE; ``noise_level = 0`` is exactly Euler). Any stock flow pipeline can use it, e.g.::

    pipe.scheduler = FlowMatchSDEScheduler.from_scheduler(
        pipe.scheduler, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    image = pipe(prompt).images[0]

The log-probability of every transition is kept in ``last_log_prob`` (not accumulated).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from flowalign.sampling import sde_step

__all__ = ["FlowMatchSDEScheduler"]


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching scheduler whose ``step`` is the Flow-GRPO SDE step (``noise_level`` = its ``a``).

    Attributes:
        generator: torch generator(s) for the Gaussian noise of each step (``None``: global RNG).
        last_log_prob: ``[B]`` log p(x_next | x) of the last step (float32).
    """

    noise_level: float = 0.7
    generator: torch.Generator | list[torch.Generator] | None = None
    last_log_prob: torch.Tensor | None = None

    @classmethod
    def from_scheduler(
        cls,
        scheduler: FlowMatchEulerDiscreteScheduler,
        noise_level: float = 0.7,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> "FlowMatchSDEScheduler":
        """A new SDE scheduler with the timestep grid settings (``config``) of ``scheduler``."""
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be a number >= 0, got {noise_level}.")
        sde = cls.from_config(scheduler.config)
        sde.noise_level, sde.generator = float(noise_level), generator
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
        # x_next = mean + sigma_t * sqrt(-dt) * z  (flowalign.sampling.sde_step; a = 0 is the Euler step)
        prev_sample, log_prob, _, _ = sde_step(
            sample,
            model_output,
            sigma,
            sigma_next,
            noise_level=self.noise_level,
            generator=generator if generator is not None else self.generator,
        )
        self.last_log_prob = log_prob
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
