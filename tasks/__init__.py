"""Downstream tasks, one module per task family, and the registry: `TASKS[name]` / `get_task(name)`.

Each task module holds, together, the task's reader (the files as the publisher distributes them, no
conversion step), its model head, its evaluation and official metric, and its synthetic version:

  nlvr2.py      NLVR2: two images + a statement -> true / false
  snli_ve.py    SNLI-VE: image + hypothesis -> entailment / neutral / contradiction
  refcoco.py    RefCOCO / RefCOCO+ / RefCOCOg: the annotated object a phrase refers to
  retrieval.py  image-text retrieval on the Karpathy splits of COCO and Flickr30k
  vqa.py        VQAv2, scored against ten human answers
  glue.py       GLUE (text only)
  cifar10.py    CIFAR-10 (image only)
  scenes.py     scene attributes of the synthetic world (image only): the vision tower's pretraining

What they share lies below them: base.py (the `Task` interface finetune.py and evaluate.py drive every
task through), common.py (reading, batching, the evaluation loop), metrics.py (accuracy, MCC, F1, Pearson,
Spearman) and synthetic.py (generating a task's synthetic version once, from the synthetic world). Adding a
task means one new module and one line in TASKS below.

Readers keep annotations in numpy arrays (strings in data.StringArray), never lists of dicts, so forked
DataLoader workers share them instead of copying them. Images are opened by content (some NLVR2 `.png`
files hold JPEG bytes), then passed through the caller's `transform(PIL.Image) -> tensor`. Bad input raises
a one-line ValueError / FileNotFoundError naming the file, line (or record) and field; a missing image is
reported when it is first read, naming the annotation that asked for it.
"""

from tasks.base import Task
from tasks.cifar10 import CIFAR10Task
from tasks.glue import GLUETask, GLUE_FORMATS
from tasks.nlvr2 import NLVR2Task
from tasks.refcoco import RefCOCOTask
from tasks.retrieval import RetrievalTask
from tasks.scenes import SceneAttributesTask
from tasks.snli_ve import SNLIVETask
from tasks.vqa import VQATask

# -----------------------------------------------------------------------------
# Registry

TASKS = {task.name: task for task in [
    NLVR2Task("nlvr2", "nlvr2", ("nlvr2_acc", "nlvr2_consistency"), ("train",), "dev", ("dev", "test1")),
    SNLIVETask("snli_ve", "snli_ve", ("snli_ve_acc",), ("train",), "dev", ("dev", "test")),
    RefCOCOTask("refcoco", "refcoco", "unc", ("val", "testA", "testB")),
    RefCOCOTask("refcoco_plus", "refcoco+", "unc", ("val", "testA", "testB")),
    RefCOCOTask("refcocog", "refcocog", "umd", ("val", "test")),
    RetrievalTask("coco_retrieval", "coco", "dataset_coco.json", "", ("train", "restval")),
    RetrievalTask("f30k_retrieval", "f30k", "dataset_flickr30k.json", "flickr30k-images", ("train",)),
    VQATask(),
    *(GLUETask(name) for name in GLUE_FORMATS),
    CIFAR10Task(),
    SceneAttributesTask(),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a downstream task; choose from {', '.join(TASKS)}")
    return TASKS[name]
