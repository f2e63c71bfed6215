# python -m pytest tests/test_metrics.py -q
"""metrics.py by hand: confusion matrix and mIoU, top-k, recall@k, mask IoU (with COCO's crowd
rule) and COCO mask AP on cases small enough to compute on paper. The AP agrees with pycocotools'
COCOeval on generated data with crowd regions (checked outside the test suite, which does not
depend on pycocotools; see evaluate.py instseg)."""

import numpy as np
import pytest
import torch

import metrics


def test_confusion_matrix_and_miou_by_hand():
    gt = torch.tensor([0, 0, 1, 1, 255, 0])
    pred = torch.tensor([0, 1, 1, 1, 3, 3])
    conf = metrics.confusion_matrix(pred, gt, num_classes=4)
    # the 255 pixel is ignored
    assert conf.tolist() == [[1, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    mean, per_class = metrics.miou(conf)
    # class 0: TP 1, FN 2 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2 absent everywhere -> NaN,
    # left out; class 3: predicted once, never present -> 0, counted
    assert per_class[0] == pytest.approx(1 / 3) and per_class[1] == pytest.approx(2 / 3)
    assert torch.isnan(per_class[2]) and per_class[3] == 0
    assert mean == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_topk_accuracy_by_hand():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # label 0: top-1 hit
            [0.5, 0.4, 0.3, 0.0],  # label 2: third best
            [0.1, 0.2, 0.3, 0.4],  # label 0: last
        ]
    )
    acc = metrics.topk_accuracy(logits, torch.tensor([0, 2, 0]), ks=(1, 3, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[3] == pytest.approx(200 / 3) and acc[5] == 100.0


def test_recall_at_k_by_hand():
    sim = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # text 0 -> image 0: rank 1
            [0.8, 0.7, 0.2],  # text 1 -> image 1: rank 2
            [0.3, 0.2, 0.15],  # text 2 -> image 2: rank 3
        ]
    )
    r = metrics.recall_at_k(sim, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert r[1] == pytest.approx(100 / 3) and r[2] == pytest.approx(200 / 3) and r[3] == 100.0
    right = torch.tensor([[True, False, False], [True, False, False], [False, False, True]])
    # image 0 has two right texts (text 0 ranks first), image 1 none, image 2 finds text 2 second
    i2t = metrics.recall_at_k(sim.T, right.T, ks=(1, 2))
    assert i2t[1] == pytest.approx(100 / 3) and i2t[2] == pytest.approx(200 / 3)


def test_mask_iou_by_hand():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # 4 pixels
    a[1, :, :] = True  # 16 pixels
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    b[0, :2, :] = True  # 8 pixels
    assert metrics.mask_iou(a, b)[:, 0].tolist() == [0.5, 0.5]


def test_average_precision_by_hand():
    # one image, two objects, three detections: 0.9 finds object 0 (IoU 0.97), 0.8 misses, 0.7
    # finds object 1 with IoU 0.62. At IoU 0.5: TP, FP, TP -> recall 0.5, 0.5, 1; precision 1, 1/2,
    # 2/3, its envelope 1, 2/3, 2/3: the 51 recall points 0..0.50 read 1, the 50 points 0.51..1
    # read 2/3.
    scores = np.array([0.8, 0.9, 0.7])
    ious = np.array([[0.1, 0.0], [0.97, 0.0], [0.0, 0.62]])
    ap50 = (51 + 50 * 2 / 3) / 101
    ap75 = 51 / 101  # the third is now FP
    assert metrics.average_precision([(scores, ious)], 0.5) == pytest.approx(ap50)
    assert metrics.average_precision([(scores, ious)], 0.75) == pytest.approx(ap75)
    res, per_cat = metrics.coco_mask_ap({7: [(scores, ious)]})
    assert res["AP50"] == pytest.approx(100 * ap50) and res["AP75"] == pytest.approx(100 * ap75)
    # thresholds 0.5, 0.55, 0.6 find both objects, the seven from 0.65 on one
    assert res["AP"] == pytest.approx(100 * (3 * ap50 + 7 * ap75) / 10)
    # two detections on one object: the second is a false positive even with a perfect IoU
    assert metrics.average_precision([(np.array([0.9, 0.8]), np.array([[1.0], [1.0]]))], 0.5) == 1.0
    # a false positive ranked first: precision 0 then 1/2, envelope 1/2 at every recall point
    assert metrics.average_precision([(np.array([0.8, 0.9]), np.array([[1.0], [0.0]]))], 0.5) == 0.5
    no_ground_truth = [(np.array([0.5]), np.zeros((1, 0)))]
    assert np.isnan(metrics.average_precision(no_ground_truth, 0.5))


def test_crowd_regions_are_ignored_ground_truth_by_hand():
    det = torch.zeros(1, 4, 4, dtype=torch.bool)
    det[0, :2, :2] = True  # 4 pixels inside a 16-pixel crowd
    crowd_region = torch.ones(1, 4, 4, dtype=torch.bool)
    assert metrics.mask_iou(det, crowd_region).item() == 0.25
    # intersection / area(det)
    assert metrics.mask_iou(det, crowd_region, crowd=[True]).item() == 1.0
    # objects 0 and 1, a crowd 2. 0.9 lies on the crowd only; 0.8 finds object 0; 0.7 lies on
    # object 0 (taken) and the crowd; 0.6 finds object 1 although it overlaps the crowd more
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    ious = np.array([[0.0, 0.0, 0.9], [0.8, 0.0, 0.3], [0.9, 0.0, 0.6], [0.0, 0.55, 0.95]])
    crowd = np.array([False, False, True])
    _, tp, ignored = metrics.match_detections(scores, ious, 0.5, crowd)
    assert tp.tolist() == [False, True, False, True]
    assert ignored.tolist() == [True, False, True, False]
    _, tp, ignored = metrics.match_detections(scores, ious, 0.6, crowd)  # 0.6 falls to the crowd
    assert tp.tolist() == [False, True, False, False]
    assert ignored.tolist() == [True, False, True, True]
    # AP: the detections on the crowd are neither TP nor FP, and the crowd is not a miss. At 0.5:
    # TP, TP of 2 objects -> 1 (as false positives the crowd's detections would give 1/2
    # everywhere); at 0.6: one TP of 2 -> precision 1 up to recall 0.5, the 51 points 0..0.50
    assert metrics.average_precision([(scores, ious, crowd)], 0.5) == 1.0
    assert metrics.average_precision([(scores, ious, crowd)], 0.6) == pytest.approx(51 / 101)
    # a category whose only ground truth is a crowd is not scored (COCOeval: no regular object)
    only_crowd = [(np.array([0.9]), np.array([[1.0]]), np.array([True]))]
    assert np.isnan(metrics.average_precision(only_crowd, 0.5))
    # COCOeval's loop keeps the LAST of equal IoUs: 0.9 takes object 1, so 0.8 (only on object 1)
    # misses
    scores = np.array([0.9, 0.8])
    ious = np.array([[0.7, 0.7], [0.0, 0.7]])
    _, tp, _ = metrics.match_detections(scores, ious, 0.5)
    assert tp.tolist() == [True, False]


def test_perfect_masks_give_ap_100():
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, :3, :3] = True
    gt[1, 4:, 4:] = True
    gt[2, :2, 5:] = True
    ious = metrics.mask_iou(gt, gt).numpy()
    res, _ = metrics.coco_mask_ap({1: [(np.array([0.3, 0.2, 0.9]), ious)]})
    assert res == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
