"""The data layer: raw files -> verified Parquet shards + manifest -> batches -> model data.

==================  ==============================================================================
module              holds
==================  ==============================================================================
``sources``         where the raw files come from (bundled, download, archive, folder), capped and
                    checksummed downloads, the MNIST / CIFAR-10 / text8 parsers
``shards``          ``prepare`` (``bfn data prepare``): splits, Parquet shards, the manifest
``manifest``        the manifest format and its validation, ``verify``, ``check_values``
``transforms``      ``preprocess`` (stored rows -> batch), ``to_model`` (batch -> model data: MNIST
                    binarisation, text8 training crop) and its seeded ``batch_generator``
``readers``         ``ray_dataset`` (Train workers), ``iter_batches`` (evaluation, tests)
``storage``         names, ``DataError``, local / s3 file access
==================  ==============================================================================

Usage: ``prepare("mnist", out)`` once; ``verify(out)`` before a run; the worker iterates
``ray_dataset(out, "train", "mnist")`` and calls ``to_model(batch["x"], "mnist", seq_len=0,
generator=batch_generator(seed, rank, step, device))`` on each batch; evaluation iterates
``iter_batches(out, "test", "mnist", batch_size=...)``, which is model-ready already.
"""

from pipeline.data.bpe import Vocabulary, load_vocabulary, vocabulary_of
from pipeline.data.manifest import (
    FORMAT_VERSION,
    check_values,
    expected_schema,
    num_rows,
    read_manifest,
    validate_manifest,
    verify,
)
from pipeline.data.readers import iter_batches, labelled_images, ray_dataset
from pipeline.data.shards import prepare, reference_split
from pipeline.data.sources import PUBLIC_URLS, download, text8_decode, text8_encode
from pipeline.data.storage import DATASETS, SPLITS, TEXT8_ALPHABET, DataError, is_text, raw_dir, s3_filesystem
from pipeline.data.transforms import (
    VALIDATION_STEP,
    batch_generator,
    batch_seed,
    preprocess,
    to_model,
)

__all__ = [
    "DATASETS",
    "FORMAT_VERSION",
    "PUBLIC_URLS",
    "SPLITS",
    "TEXT8_ALPHABET",
    "VALIDATION_STEP",
    "Vocabulary",
    "DataError",
    "batch_generator",
    "batch_seed",
    "check_values",
    "download",
    "expected_schema",
    "is_text",
    "iter_batches",
    "labelled_images",
    "load_vocabulary",
    "num_rows",
    "prepare",
    "preprocess",
    "ray_dataset",
    "raw_dir",
    "s3_filesystem",
    "read_manifest",
    "reference_split",
    "text8_decode",
    "text8_encode",
    "to_model",
    "validate_manifest",
    "verify",
    "vocabulary_of",
]
