"""What a dataset must hold before ``casam-train`` spends anything on it.

Embedding a dataset and training the alignment layer take minutes to hours; a dataset too
small for a later stage must be refused before that work starts, not after it (and not by
leaving a resume state behind in ``.staging/``). So the minimum of every later stage is
checked here, from the split alone:

- K-fold threshold calibration (``trainer.calibration``) scores each fold with a VAE
  trained on the other folds, so it needs at least two training images (it then runs
  ``min(--folds, n)`` folds);
- the alignment layer trains on the same images;
- evaluation needs nothing: an empty test split records ``null`` metrics. The seeded
  80/20 split, though, holds one image out as soon as there are two, so a folder without
  a recorded split needs one image more.
"""

from __future__ import annotations

from trainer.data import DataError, Dataset

#: K-fold calibration trains each fold's VAE on the other folds: two folds of one image.
MIN_TRAINING_IMAGES = 2


def check_dataset_size(dataset: Dataset, folds: int) -> None:
    """Raise ``DataError`` saying how many images are needed and how many were found."""
    n_train, n_test = len(dataset.train), len(dataset.test)
    if n_train >= MIN_TRAINING_IMAGES:
        return
    held_out = 1 if dataset.split_source.startswith("seeded") else 0
    needed = MIN_TRAINING_IMAGES + held_out
    why = f"{MIN_TRAINING_IMAGES} to train, as {min(folds, MIN_TRAINING_IMAGES)}-fold threshold calibration needs"
    why += ", and 1 that the seeded split holds out for evaluation" if held_out else " (split: " + dataset.split_source + ")"
    raise DataError(
        f"{dataset.root}: casam-train needs at least {needed} images with a non-empty mask ({why}); "
        f"found {n_train + n_test} ({n_train} for training, {n_test} held out)"
    )
