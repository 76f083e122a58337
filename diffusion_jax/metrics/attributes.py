"""Does a generated digit show what its prompt asked for? Class and attribute accuracy.

The class is read by the digits classifier (`digits_classifier.classifier_logits`), the
attributes are measured by `data.captions.measure_attributes` (image moments with fixed
thresholds), so a real digit with its own caption scores 1 on attributes by construction.
"""

import numpy as np

from diffusion_jax.data import captions
from diffusion_jax.data import digits
from diffusion_jax.metrics import digits_classifier


def attribute_accuracy(classifier_params, images, labels, attributes) -> dict[str, float]:
  """Accuracies of `[N, S, S, 1]` digits against their prompts' `labels` `[N]` and named
  `attributes` `[N, A]` (-1 = the prompt names no value).

  Returns:
    `class_accuracy`      mean of [argmax classifier logits == label];
    `attribute_accuracy`  mean of [measured value == named value for every named attribute]
                          (a prompt naming none counts as met);
    `joint_accuracy`      mean of [class and every named attribute met];
    `attr/<name>`         per attribute, over the prompts that name it (NaN if none does).
  """
  labels = np.asarray(labels)
  attributes = np.asarray(attributes)
  n = len(images)
  if labels.shape != (n,) or attributes.shape != (n, len(captions.ATTRIBUTES)):
    raise ValueError(f'attribute_accuracy: {n} images need labels [{n}] and attributes '
                     f'[{n}, {len(captions.ATTRIBUTES)}]; got {labels.shape} and '
                     f'{attributes.shape}')
  native = np.clip(digits.to_native(np.asarray(images, np.float32)), -1.0, 1.0)
  class_ok = np.argmax(digits_classifier.classifier_logits(classifier_params, native), -1) == labels
  measured = captions.measure_attributes(native)  # [N, A]
  named = attributes != captions.NOT_NAMED
  match = (measured == attributes) | ~named  # [N, A]
  attrs_ok = np.all(match, axis=1)
  out = {
      'class_accuracy': float(np.mean(class_ok)),
      'attribute_accuracy': float(np.mean(attrs_ok)),
      'joint_accuracy': float(np.mean(class_ok & attrs_ok)),
  }
  for k, name in enumerate(captions.ATTRIBUTES):
    rows = named[:, k]
    out[f'attr/{name}'] = float(np.mean(match[rows, k])) if rows.any() else float('nan')
  return out
