"""The numbers the paper reports, computed in the open (SAM-CLIP Sec. 4.2-4.4): no pycocotools.

  topk_accuracy       zero-shot classification, top-1 / top-5 (Table 1)
  recall_at_k         image-text retrieval, R@1/5/10 in both directions (Table 1)
  confusion_matrix,   semantic segmentation: one confusion matrix accumulated over a dataset,
  miou                IoU per class, the mean over classes present (mmsegmentation's nanmean;
                      Tables 2, 5)
  mask_iou,           instance segmentation mask AP (Table 1) by COCOeval's rules (Lin et al. 2014;
  match_detections,   pycocotools' cocoeval.py): greedy matching by score, crowd regions ignored,
  average_precision,  the precision envelope read at 101 recall points, averaged over the IoU
  coco_mask_ap        thresholds 0.50:0.05:0.95 and over the categories with ground truth

Pure functions of tensors and arrays, each checked against hand-computed cases in
tests/test_metrics.py and, for the AP, against pycocotools' COCOeval (see evaluate.py instseg).

Shape legend: N detections or queries, G ground-truth objects, K classes, H W mask size.
"""

import numpy as np
import torch
import torch.nn.functional as F

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall points
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 0.50:0.05:0.95


def topk_accuracy(logits, labels, ks=(1, 5)):
    """logits (N, K), labels (N,) -> {k: percent of rows whose label is in the top k}; k is capped
    at K (with 3 classes, top-5 is 100%)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k_max)
    hit = top == labels[:, None]  # (N, k_max)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def recall_at_k(sim, gt, ks=(1, 5, 10)):
    """sim (N_query, N_item) scores; gt: (N_query,) index of the one right item per query, or a bool
    (N_query, N_item) matrix of right pairs (a query may have several, e.g. an image's 5 captions).
    -> {k: percent of queries with a right item among their k best}."""
    if gt.dtype != torch.bool:
        gt = F.one_hot(gt, sim.shape[1]).bool()  # (N_query,) -> (N_query, N_item)
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).indices  # (N_query, k_max)
    hit = gt.gather(1, top)  # (N_query, k_max)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def confusion_matrix(pred, gt, num_classes, ignore_index=255):
    """Integer label maps of any equal shape -> (K, K) int64 counts, rows ground truth, columns
    prediction. Pixels with gt == ignore_index (or outside 0..K-1) are not counted."""
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    idx = gt[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    counts = torch.bincount(idx, minlength=num_classes**2)  # (K*K,)
    return counts.reshape(num_classes, num_classes)  # (K*K,) -> (K, K)


def miou(conf):
    """(K, K) confusion -> (mean IoU, per-class IoU (K,)), fractions. IoU = TP / (TP + FP + FN). A
    class absent from both ground truth and prediction has no IoU (NaN) and is left out of the mean
    (mmsegmentation's nanmean); a class predicted but never present scores 0 and counts."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou.nanmean().item(), iou


def mask_iou(a, b, crowd=None):
    """bool masks a (N, H, W), b (G, H, W) -> (N, G) IoU in float64, 0 where both masks are empty.
    Against a crowd ground truth (crowd: bool (G,)) the score is intersection / area(a), COCO's
    crowd rule: a detection lying inside a crowd region scores 1 however large the region is."""
    a = a.flatten(1).float()  # (N, H, W) -> (N, H*W)
    b = b.flatten(1).float()  # (G, H, W) -> (G, H*W)
    inter = (a @ b.T).double()  # (N, G), exact counts below 2^24 px
    area_a = a.sum(1).double()[:, None]  # (N, 1)
    union = area_a + b.sum(1).double()[None, :] - inter
    if crowd is not None:
        union = torch.where(torch.as_tensor(crowd, dtype=torch.bool)[None, :], area_a, union)
    return inter / union.clamp(min=1)


def match_detections(scores, ious, threshold, crowd=None):
    """COCOeval.evaluateImg's greedy matching in one image and category. Detections in descending
    score order (stable sort) each take, among the regular ground truths not yet taken, the one of
    highest IoU >= threshold (of equal IoUs the later, as COCOeval's loop does); only if none
    qualifies do they try the crowd ones (ignored ground truth), which any number of detections may
    take. A detection that lands on a crowd is ignored: neither a true nor a false positive.
    scores (N,), ious (N, G), crowd bool (G,) or None
    -> (scores sorted, true positive, ignored), (N,) each."""
    G = ious.shape[1]
    crowd = np.zeros(G, bool) if crowd is None else np.asarray(crowd, bool)
    order = np.argsort(-scores, kind="mergesort")
    taken = np.zeros(G, bool)
    tp = np.zeros(len(order), bool)
    ignored = np.zeros(len(order), bool)
    for j, d in enumerate(order):
        for pool in (~crowd & ~taken, crowd):  # regular ground truths first
            cand = np.where(pool, ious[d], -1.0)  # (G,)
            if G and cand.max() >= threshold:
                g = G - 1 - int(cand[::-1].argmax())  # the last of equal bests
                taken[g] = not crowd[g]
                tp[j] = not crowd[g]
                ignored[j] = crowd[g]
                break
    return scores[order], tp, ignored


def average_precision(images, threshold, max_dets=100):
    """COCO AP of one category at one IoU threshold, as COCOeval.accumulate computes it. images: per
    image (scores (N,), ious (N, G)) or (scores, ious, crowd (G,)). The max_dets best-scored
    detections of each image (per category, as COCOeval with useCats) are matched; those on a crowd
    are dropped; the rest of all images are ranked by score (ties in image order); precision is made
    non-increasing (its upper envelope) and read at the 101 recall points, a point past the largest
    recall reached giving 0. Recall counts regular ground truth only. -> AP in 0..1, NaN if there is
    none (a category with only crowds is not scored, as in COCOeval)."""
    all_scores = []
    all_tp = []
    npos = 0
    for scores, ious, *crowd in images:
        ious = np.asarray(ious, float)
        crowd = np.asarray(crowd[0], bool) if crowd else np.zeros(ious.shape[1], bool)
        # matching is greedy in score order, so cutting after it equals COCOeval's cut before it
        s, tp, ignored = match_detections(np.asarray(scores, float), ious, threshold, crowd)
        keep = ~ignored[:max_dets]
        all_scores.append(s[:max_dets][keep])
        all_tp.append(tp[:max_dets][keep])
        npos += int((~crowd).sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-np.concatenate(all_scores), kind="mergesort")
    tp = np.concatenate(all_tp)[order]
    tpc = np.cumsum(tp)
    fpc = np.cumsum(~tp)
    recall = tpc / npos
    precision = tpc / np.maximum(tpc + fpc, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope from the right
    idx = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def coco_mask_ap(records):
    """records: {category: [(scores, ious[, crowd]) per image, in image id order]} -> {"AP", "AP50",
    "AP75"} in percent and the per-category AP (0..1): AP averaged over the 10 IoU thresholds, then
    over the categories that have regular (non-crowd) ground truth, as COCOeval.summarize does."""
    ap = [[average_precision(imgs, t) for t in IOU_THRESHOLDS] for imgs in records.values()]
    ap = np.array(ap).reshape(len(records), len(IOU_THRESHOLDS))  # (C, 10), NaN rows: no gt
    has_gt = np.isfinite(ap[:, 0])

    def percent(per_category):  # the mean over the categories with ground truth
        return 100.0 * float(per_category[has_gt].mean()) if has_gt.any() else float("nan")

    summary = {"AP": percent(ap.mean(1)), "AP50": percent(ap[:, 0]), "AP75": percent(ap[:, 5])}
    return summary, dict(zip(records, ap.mean(1)))
