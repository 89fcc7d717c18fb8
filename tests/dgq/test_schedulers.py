"""Sampler choice by name: aliases and class names, clear refusals, the model's config kept."""

from __future__ import annotations

import argparse

import diffusers
import pytest

from dgq import schedulers
from dgq.zoo import configs


def test_aliases_and_class_names_resolve():
    assert schedulers.scheduler_class("dpm++") is diffusers.DPMSolverMultistepScheduler
    assert schedulers.scheduler_class("Euler") is diffusers.EulerDiscreteScheduler
    assert schedulers.scheduler_class("ddimscheduler") is diffusers.DDIMScheduler
    for name in schedulers.ALIASES:
        assert issubclass(schedulers.scheduler_class(name), diffusers.SchedulerMixin), name


def test_unknown_name_is_refused_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown scheduler 'eulr'.*did you mean euler"):
        schedulers.scheduler_class("eulr")
    with pytest.raises(argparse.ArgumentTypeError, match="has no such scheduler"):
        schedulers.argtype("UNet2DConditionModel")


def test_swap_keeps_the_model_config_and_refuses_incompatible_samplers():
    sd21 = diffusers.DDIMScheduler(**configs.SD21_SCHEDULER)
    euler = schedulers.swap(sd21, "euler")
    assert type(euler) is diffusers.EulerDiscreteScheduler
    assert euler.config.prediction_type == "v_prediction" and euler.config.beta_schedule == "scaled_linear"
    assert (euler.alphas_cumprod == sd21.alphas_cumprod).all()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is not compatible with this model's"):
        schedulers.swap(sd21, "FlowMatchEulerDiscreteScheduler")
