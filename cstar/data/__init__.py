"""Dataset registry: digits (embedded default), Fashion-MNIST, CIFAR-10, any ImageFolder tree.

Every dataset yields float32 CHW images in [0, 1] and int64 labels; normalization lives in the
model. Each carries a `DatasetSpec` (input shape, classes, mean/std, default eps) that manifests
record so later stages can rebuild the same view of the data.

The package, one concept per module: `spec` (`DatasetSpec`), `tensors` (`TensorImageDataset`,
`DataBundle`, `to_tensors`, `stratified_indices`, the loaders' resize and channel statistics),
`registry` (`register_dataset`, `dataset_names`, `parse_dataset_arg`, `load_dataset`,
`load_dataset_from_spec`), `image_tree` (class folders and the cached decode of a `split/<class>/*`
tree) and one module per loader: `digits`, `fashion_mnist` (IDX files), `cifar10` (pickle batches or
an image tree) and `imagefolder`. Imports go one way: spec <- tensors <- registry <- the loaders;
importing this package imports every loader, which registers it.
"""

from cstar.data import cifar10, digits, fashion_mnist, imagefolder  # noqa: F401  (register the loaders)
from cstar.data.cifar10 import CIFAR10_CLASSES
from cstar.data.fashion_mnist import FASHION_CLASSES, FASHION_MNIST_DEFAULT_PATH
from cstar.data.image_tree import IMAGE_SUFFIXES
from cstar.data.imagefolder import ImageFolderDataset
from cstar.data.registry import (
    Loader,
    dataset_names,
    load_dataset,
    load_dataset_from_spec,
    parse_dataset_arg,
    register_dataset,
)
from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle, TensorImageDataset, stratified_indices, to_tensors

__all__ = [
    "CIFAR10_CLASSES", "FASHION_CLASSES", "FASHION_MNIST_DEFAULT_PATH", "IMAGE_SUFFIXES", "DataBundle",
    "DatasetSpec", "ImageFolderDataset", "Loader", "TensorImageDataset", "dataset_names", "load_dataset",
    "load_dataset_from_spec", "parse_dataset_arg", "register_dataset", "stratified_indices", "to_tensors",
]
