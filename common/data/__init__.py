"""Site datasets for FedPaGKD (docs/usage.md, own data), one module per concern:

* :mod:`common.data.base`: :class:`DataError`, the names (modalities, splits, default class
  names, ImageNet mean/std, a real site's file names), the checks and :class:`SiteData` (one
  site's splits).
* :mod:`common.data.synthetic`: the synthetic NBI/WLI endoscopy renderer
  (:class:`SyntheticSiteSpec`, :class:`SyntheticEndoscopyDataset`, :func:`write_image_folder`)
  and the embedded federation of a run config (:func:`synthetic_site_specs`, :func:`synthetic_site`).
* :mod:`common.data.folders`: real sites, an ImageFolder tree or a CSV manifest
  (:class:`FolderSiteDataset`, :func:`load_image`, :func:`discover_class_names`).
* :mod:`common.data.batching`: :func:`build_transform`, :class:`BatchAugment`,
  :class:`ClassBalancedBatchSampler` (from a dataset to PaGKD's class-balanced batches).

Every dataset's item is ``(image, label)``: a float tensor [3, S, S] (or ``transform(PIL.Image)``)
and an int in ``0..C-1``. ``from common.data import X`` works for every public name below.
"""

from common.data.base import (
    DEFAULT_CLASS_NAMES,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    MODALITIES,
    SITE_FILE,
    SITE_NAME_RE,
    SPLITS,
    DataError,
    SiteData,
    check_modality,
    check_site_name,
    check_split,
    default_class_names,
    normalise_modality,
)
from common.data.batching import BatchAugment, ClassBalancedBatchSampler, build_transform
from common.data.folders import (
    FolderSiteDataset,
    class_names_source,
    discover_class_names,
    has_split,
    load_image,
    read_manifest,
    to_rgb,
    write_site_json,
)
from common.data.synthetic import (
    LATENT_NAMES,
    SyntheticEndoscopyDataset,
    SyntheticSiteSpec,
    severity_posterior,
    synthetic_site,
    synthetic_site_specs,
    write_image_folder,
)

__all__ = [
    "BatchAugment",
    "ClassBalancedBatchSampler",
    "DEFAULT_CLASS_NAMES",
    "DataError",
    "FolderSiteDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "LATENT_NAMES",
    "MANIFEST_COLUMNS",
    "MANIFEST_FILE",
    "MODALITIES",
    "SITE_FILE",
    "SITE_NAME_RE",
    "SPLITS",
    "SiteData",
    "SyntheticEndoscopyDataset",
    "SyntheticSiteSpec",
    "build_transform",
    "check_modality",
    "check_site_name",
    "check_split",
    "class_names_source",
    "default_class_names",
    "discover_class_names",
    "has_split",
    "load_image",
    "normalise_modality",
    "read_manifest",
    "severity_posterior",
    "synthetic_site",
    "synthetic_site_specs",
    "to_rgb",
    "write_image_folder",
    "write_site_json",
]
