"""Audio: waveforms `[N, L, 1]` in [-1, 1] and the features computed from them.

- `features`: STFT, HTK mel filterbank (Slaney area normalisation), log-mel, MFCC (JAX, with
  numpy float64 twins for host-side metrics); `MelConfig`, the `mel` config section.
- `io`: 16-bit PCM WAV files, log-mel spectrogram PNGs, a listening folder per evaluation.
- `conditioning`: the `mel` config section: a waveform model (WaveGrad) conditioned on each
  clip's log-mel spectrogram and on the noise level sqrt(abar), scored against held-out clips.
- `schedules`: WaveGrad's noise schedules (betas) as explicit sampler grids; their grid search.

Distances between waveforms (LSD, MCD, multi-resolution STFT) live in `diffusion_jax.metrics.audio`.
"""
