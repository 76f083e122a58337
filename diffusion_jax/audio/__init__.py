"""Audio: waveforms `[N, L, 1]` in [-1, 1] and the features computed from them.

- `features`: STFT, HTK mel filterbank (Slaney area normalisation), log-mel, MFCC (JAX, with
  numpy float64 twins for host-side metrics); `MelConfig`, the `mel` config section.
- `io`: 16-bit PCM WAV files, log-mel spectrogram PNGs, a listening folder per evaluation.

Distances between waveforms (LSD, MCD, multi-resolution STFT) live in `diffusion_jax.metrics.audio`.
"""
