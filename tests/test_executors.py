"""Executors: the Ray backend on a real local cluster scores exactly as the in-process one."""

from __future__ import annotations

import pytest

from agent_forge.evomerge.config import EvolutionSettings, create_default_config
from agent_forge.evomerge.evolutionary_tournament import EvolutionaryMerger
from agent_forge.evomerge.executors import RayExecutor, SerialExecutor, make_executor


def small_config(tmp_path, name):
    config = create_default_config()
    config.output_dir = str(tmp_path / name)
    config.evaluation_settings.fitness_sample_size = 24
    config.evolution_settings = EvolutionSettings(
        population_size=4, num_generations=2, tournament_size=2, elite_size=1
    )
    return config


def test_ray_workers_score_like_the_serial_executor(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is a test extra: pip install -e '.[test]'")
    serial_config = small_config(tmp_path, "serial")
    serial = EvolutionaryMerger(serial_config, serial_config.output_dir)
    serial.evolve()
    ray_config = small_config(tmp_path, "ray")
    ray_config.backend = "ray"
    ray_config.workers = 2
    executor = make_executor(ray_config)
    try:
        assert isinstance(executor, RayExecutor) and len(executor.actors) == 2
        distributed = EvolutionaryMerger(ray_config, ray_config.output_dir, executor=executor)
        distributed.evolve()
    finally:
        executor.close()
        ray.shutdown()
    assert list(distributed.records) == list(serial.records)
    assert [r["fitness"] for r in distributed.records.values()] == [
        r["fitness"] for r in serial.records.values()
    ]


def test_serial_is_the_default_executor(tmp_path):
    assert isinstance(make_executor(small_config(tmp_path, "s")), SerialExecutor)
