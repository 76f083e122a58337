"""Samplers run sharded over devices: the batch axis of `x_T` split over 8 CPU devices gives
the same samples as one device (DESIGN §4, §5). Runs in a subprocess, since the device count is
fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from diffusion_jax import analytic, processes, samplers
    assert jax.device_count() == 8, jax.devices()
    proc = processes.DiscreteVP.from_name('linear', 1000)
    den = analytic.gmm_denoiser([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], [[0.05] * 2] * 2, proc)
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))
    # One of each family: discrete ancestral, EDM with churn, multistep, SDE, PC, adaptive.
    names = ['ddpm', 'heun', 'dpm_solver_pp_2m', 'euler_maruyama', 'pc', 'adaptive']
    for name in names:
      fn = samplers.SAMPLERS[name]
      kw = {'s_churn': 5.0} if name == 'heun' else {}
      run = jax.jit(lambda x, k: fn(den, proc, x, k, steps=8, **kw)[0])
      try:
        ref = run(x_T, jax.random.key(1))
      except (TypeError, ValueError) as e:   # a sampler that needs other arguments
        print('SKIP', name, e)
        continue
      out = run(jax.device_put(x_T, sharding), jax.random.key(1))
      # The adaptive solver shares one step size across the batch (a global error norm), so XLA
      # may return its result replicated; the values must still agree.
      if name != 'adaptive':
        assert out.sharding.is_equivalent_to(sharding, 2), (name, out.sharding)
      err = float(jnp.max(jnp.abs(out - ref)))
      # Fixed-step samplers agree to float32 rounding (6e-8, amplified by up to 1/alpha(1) = 157
      # where samplers work in x / alpha, over 8 steps: < 1e-4). The adaptive one takes a
      # different (equally valid) sequence of accepted steps when the error norm is reduced in
      # another order, so its two
      # results agree to its tolerance (rtol = atol = 1e-5 per step, ~1e-3 globally in float32
      # on this DiscreteVP, whose alpha(t) has a kink at every integer step).
      assert err < (5e-3 if name == 'adaptive' else 1e-4), (name, err)
      print('OK', name, err)
""")


# ~50 s of a CI worker: `slow`. test_sharded_training.py's default run keeps DDIM sampling,
# sharded over 8 devices against one.
@pytest.mark.slow
def test_every_sampler_runs_sharded_and_matches_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.join(os.path.dirname(__file__), '..')
  done = subprocess.run([sys.executable, '-c', SCRIPT], cwd=root, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  ok = [ln for ln in done.stdout.splitlines() if ln.startswith('OK')]
  assert len(ok) == 6, done.stdout
