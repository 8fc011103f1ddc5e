"""Post-processing: probabilities -> class map -> cleaned mask -> nucleus instances.

Configured by ``conf/postprocess/*.yaml`` and stored in checkpoints, so evaluation and prediction apply
exactly what validation used.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation


def to_class_map(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(1,H,W)`` foreground probabilities -> {0,1} by threshold; ``(K,H,W)`` -> argmax."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"expected (K,H,W) probabilities, got {probs.shape}")
    if probs.shape[0] == 1:
        return (probs[0] > threshold).astype(np.uint8)
    return probs.argmax(0).astype(np.uint8)


def clean_binary(mask: np.ndarray, opening_radius: int = 0, fill_holes: bool = False, min_size: int = 0) -> np.ndarray:
    """Morphological opening (disk radius), hole filling and small-object removal on a binary mask."""
    m = np.asarray(mask).astype(bool)
    if opening_radius > 0:
        m = ndi.binary_opening(m, structure=morphology.disk(int(opening_radius)).astype(bool))
    if fill_holes:
        m = ndi.binary_fill_holes(m)
    if min_size > 0:
        m = morphology.remove_small_objects(m, max_size=int(min_size) - 1) if _new_skimage() else \
            morphology.remove_small_objects(m, min_size=int(min_size))
    return m


def _new_skimage() -> bool:
    import inspect

    return "max_size" in inspect.signature(morphology.remove_small_objects).parameters


def clean_class_map(labels: np.ndarray, opening_radius: int = 0, fill_holes: bool = False, min_size: int = 0,
                    classes: list[int] | None = None) -> np.ndarray:
    """Clean a class map per foreground class: morphological opening, hole filling, small-object removal (the
    steps and order of :func:`clean_binary`, which this equals on a binary map).

    ``classes``: the classes cleaned (default every foreground class); the others keep their pixels as they are
    (e.g. a 3 px boundary ring, which an opening of radius 2 would erase). Pixels a cleaned class loses become
    background. A hole is a background region enclosed by foreground (of any classes): it takes the class that
    covers most of its border, if that class is cleaned, so hole filling never overwrites another class's pixels
    (a nucleus inside a ring of another class stays that nucleus).
    """
    labels = np.asarray(labels)
    present = [int(k) for k in np.unique(labels) if k != 0]
    cleaned = present if classes is None else sorted(set(present) & {int(c) for c in classes})
    out = np.where(np.isin(labels, cleaned), 0, labels).astype(labels.dtype)
    for k in cleaned:
        out[clean_binary(labels == k, opening_radius)] = k
    if fill_holes and cleaned:
        out = fill_class_holes(out, cleaned)
    if min_size > 0:
        for k in cleaned:
            own = out == k
            out[own & ~clean_binary(own, min_size=min_size)] = 0
    return out


def fill_class_holes(labels: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """Fill the background holes of a class (or instance) map: each hole (background enclosed by foreground) takes
    the label most common on its 1 px outer border, when that label is one of ``classes`` (default: any)."""
    holes = ndi.binary_fill_holes(labels > 0) & (labels == 0)
    if not holes.any():
        return labels
    lab, _ = ndi.label(holes)
    out = labels.copy()
    allowed = None if classes is None else {int(c) for c in classes}
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        hole = lab[sl] == i
        border = labels[sl][ndi.binary_dilation(hole) & ~hole]
        border = border[border > 0]
        if border.size:
            k = int(np.bincount(border).argmax())
            if allowed is None or k in allowed:
                out[sl][hole] = k
    return out


def smoothed_distance(mask: np.ndarray, smooth: float = 1.0) -> np.ndarray:
    """Euclidean distance to the background inside ``mask``, Gaussian-smoothed (sigma ``smooth``; 0: none)."""
    dist = ndi.distance_transform_edt(np.asarray(mask).astype(bool))
    return ndi.gaussian_filter(dist, smooth) if smooth > 0 else dist


def distance_watershed(mask: np.ndarray, h: float = 1.0, smooth: float = 1.0, min_size: int = 0,
                       dist: np.ndarray | None = None) -> np.ndarray:
    """Split touching nuclei: markers are the h-maxima of the (smoothed) distance transform of ``mask``;
    flooding ``-distance`` from them inside the mask gives one label per nucleus. ``dist``: the
    ``smoothed_distance(mask, smooth)`` when already computed (threshold tuning reuses it across ``h``)."""
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return np.zeros(m.shape, np.int32)
    if dist is None:
        dist = smoothed_distance(m, smooth)
    markers, _ = ndi.label(morphology.h_maxima(dist, h) if h > 0 else morphology.local_maxima(dist))
    inst = segmentation.watershed(-dist, markers, mask=m)
    if min_size > 0:
        inst = remove_small_instances(inst, min_size)
    return inst.astype(np.int32)


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / max(a.max() - a.min(), 1e-6)


def _check_hv_ksize(ksize) -> int:
    k = int(ksize)
    if k < 3 or k > 31 or k % 2 == 0:
        raise ValueError(f"hv_ksize must be an odd Sobel kernel size from 3 to 31, got {ksize!r}")
    return k


def hv_edges(hv: np.ndarray, ksize: int = 3, signed: bool = False) -> np.ndarray:
    """Nucleus borders from HoVer-Net offset maps ``hv`` (2xHxW: horizontal, vertical), in [0, 1], high on borders.

    Each map is min-max normalised and differentiated along its own axis with a ``ksize`` Sobel kernel (odd,
    3..31; larger kernels smooth more across the other axis); each derivative is normalised to [0, 1] and the
    two are combined by maximum. ``signed=False``: the derivative's magnitude. ``signed=True``: its sign kept, as
    HoVer-Net's own post-processing does: the offsets rise across a nucleus (from -1 to +1), so they fall only
    at its borders, and the most negative derivative is the strongest edge; HoVer-Net uses ``ksize=21, signed``.
    """
    k = _check_hv_ksize(ksize)
    h, v = _minmax(np.asarray(hv[0], np.float32)), _minmax(np.asarray(hv[1], np.float32))
    if k == 3 and not signed:  # histoseg's first rule (skimage's 3x3 Sobel), kept exactly for stored settings
        from skimage.filters import sobel_h, sobel_v

        return np.maximum(_minmax(np.abs(sobel_v(h))), _minmax(np.abs(sobel_h(v))))
    import cv2

    gh = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=k)  # d/dx of the horizontal offsets
    gv = cv2.Sobel(v, cv2.CV_32F, 0, 1, ksize=k)  # d/dy of the vertical offsets
    gh, gv = (-gh, -gv) if signed else (np.abs(gh), np.abs(gv))
    return np.maximum(_minmax(gh), _minmax(gv))


# the predicted maps each marker source reads, and the head each map comes from (SegmentationTask.predict_maps)
MARKER_MAPS = {"interior": ("interior",), "distance": ("dist",), "interior_distance": ("interior", "dist"),
               "hv": ("hv",), "interior_distance_hv": ("interior", "dist", "hv")}
HEAD_OF_MAP = {"interior": "seg: 3", "dist": "dist", "hv": "hv"}


def marker_watershed(
    fg: np.ndarray,
    maps: dict[str, np.ndarray],
    source: str = "interior",
    marker_threshold: float = 0.5,
    min_marker_size: int = 5,
    smooth: float = 1.0,
    cache: StageCache | None = None,
    hv_ksize: int = 3,
    hv_signed: bool = False,
) -> np.ndarray:
    """Marker-controlled watershed from predicted maps (instance-aware heads).

    Sources:
        ``interior``: markers = P(interior) > t (three-class head); energy = -P(interior).
        ``distance``: markers = distance map > t; energy = -distance.
        ``interior_distance``: markers = sqrt(P(interior) * distance) > t; energy = -distance.
        ``hv``: HoVer-Net: edges from Sobel derivatives of the hv maps (:func:`hv_edges`, kernel ``hv_ksize``,
            ``hv_signed``); markers = foreground minus edges (1 - edges > t); flooding ``-(1 - edges)`` smoothed.
        ``interior_distance_hv``: all three heads: markers = sqrt(P(interior) * distance) * (1 - edges) > t, so an
            hv border cuts a marker the interior and distance maps left whole; energy = -distance * (1 - edges),
            so the flooding lines follow the hv borders between touching nuclei.

    ``cache``: reuses the smoothed energy between calls that differ only in the marker settings (tuning).
    """
    if source not in MARKER_MAPS:
        raise ValueError(f"marker source must be one of {sorted(MARKER_MAPS)}, got {source!r}")
    missing = [k for k in MARKER_MAPS[source] if k not in maps]
    if missing:
        raise ValueError(f"marker_source={source} needs the model's {missing} map(s) (heads "
                         f"{[HEAD_OF_MAP[k] for k in missing]}); the maps given are {sorted(maps)}")
    fg = np.asarray(fg).astype(bool)
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    uses_hv = "hv" in MARKER_MAPS[source]
    # not masked by fg here: cached per hv rule, reused across foreground thresholds
    edges = _stage(cache, "hv_edges", (int(hv_ksize), bool(hv_signed)),
                   lambda: hv_edges(maps["hv"], hv_ksize, hv_signed)) if uses_hv else None
    if source == "interior":
        score = maps["interior"]
        energy = -score
    elif source == "distance":
        score = maps["dist"]
        energy = -score
    elif source == "interior_distance":
        score = np.sqrt(np.clip(maps["interior"], 0, 1) * np.clip(maps["dist"], 0, 1))
        energy = -maps["dist"]
    elif source == "hv":
        edges = edges * fg
        score = 1 - edges  # high inside nuclei, low on their borders
        energy = -ndi.gaussian_filter((1 - edges) * fg, 1.0)
    elif source == "interior_distance_hv":
        # edges unmasked: the energy then depends on the hv rule only (cached across foreground thresholds)
        dist = np.clip(maps["dist"], 0, 1)
        score = np.sqrt(np.clip(maps["interior"], 0, 1) * dist) * (1 - edges)
        energy = -dist * (1 - edges)
    if smooth > 0 and source != "hv":
        raw = energy
        key = (source, smooth) + ((int(hv_ksize), bool(hv_signed)) if uses_hv else ())
        energy = _stage(cache, "energy", key, lambda: ndi.gaussian_filter(raw, smooth))
    markers = (score > marker_threshold) & fg
    markers = ndi.binary_opening(markers, structure=np.ones((3, 3), bool)) if min_marker_size > 1 else markers
    markers, _ = ndi.label(markers)
    if min_marker_size > 1:
        markers = remove_small_instances(markers, min_marker_size)
    inst = segmentation.watershed(energy, markers, mask=fg)
    # foreground blobs that received no marker stay objects of their own (never silently dropped)
    orphans, n = ndi.label(fg & (inst == 0))
    if n:
        inst = np.where(orphans > 0, orphans + inst.max(), inst)
    return inst.astype(np.int32)


def remove_small_instances(inst: np.ndarray, min_size: int) -> np.ndarray:
    areas = np.bincount(inst.ravel())
    small = np.nonzero(areas < min_size)[0]
    out = inst.copy()
    out[np.isin(out, small[small > 0])] = 0
    from histoseg.metrics.instance import remap_label

    return remap_label(out)


def merge_small_instances(inst: np.ndarray, min_size: int) -> np.ndarray:
    """Objects under ``min_size`` px that touch another object (8-connectivity) are merged into the neighbour
    they share most border pixels with (smallest first); isolated small objects stay. No pixel changes from
    nucleus to background, unlike :func:`remove_small_instances`."""
    from histoseg.metrics.instance import remap_label

    out = remap_label(np.asarray(inst).astype(np.int32))
    if min_size <= 1 or not out.any():
        return out
    areas = np.bincount(out.ravel())
    boxes = ndi.find_objects(out)
    small = np.nonzero(areas < min_size)[0]
    for i in sorted(small[small > 0], key=lambda j: areas[j]):
        if areas[i] >= min_size:  # grown past min_size by smaller objects merged into it
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[i - 1])
        win = out[sl]
        me = win == i
        if not me.any():  # already merged away
            continue
        ring = ndi.binary_dilation(me, structure=np.ones((3, 3), bool)) & ~me
        nb = win[ring]
        nb = nb[(nb > 0) & (nb != i)]
        if nb.size:
            target = np.bincount(nb).argmax()
            win[me] = target
            areas[target] += areas[i]
            areas[i] = 0
            boxes[target - 1] = tuple(slice(min(p.start, q.start), max(p.stop, q.stop))  # its box covers both now
                                      for p, q in zip(boxes[target - 1], boxes[i - 1]))
    return remap_label(out)


def split_mask(fg: np.ndarray, maps: dict[str, np.ndarray], pp: PostProcessor, merge_below: int | None = None
               ) -> np.ndarray:
    """Split a given nucleus mask (e.g. an annotated binary mask whose touching nuclei are merged) into nuclei
    with a model's markers and watershed energy (``pp``'s ``marker_source`` / ``marker_threshold`` /
    ``min_marker_size`` / ``smooth``): pseudo instance maps for training images annotated only as a mask.
    Every mask pixel keeps a label (blobs without a marker are one nucleus) and no label leaves the mask;
    fragments under ``merge_below`` px (default ``pp.min_size``) join their largest-border neighbour."""
    fg = np.asarray(fg).astype(bool)
    inst = marker_watershed(fg, maps, pp.marker_source, pp.marker_threshold, pp.min_marker_size, pp.smooth,
                            hv_ksize=pp.hv_ksize, hv_signed=pp.hv_signed)
    return merge_small_instances(inst, pp.min_size if merge_below is None else int(merge_below))


class StageCache(dict):
    """One slot per post-processing stage (``stage -> (settings key, result)``) for one image: calls in an order
    that changes the late settings fastest (see ``histoseg.inference.tuning``) recompute only what changed,
    with memory bounded by one array per stage."""


def _stage(cache: StageCache | None, stage: str, key, compute):
    if cache is None:
        return compute()
    hit = cache.get(stage)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    cache[stage] = (key, value)
    return value


class PostProcessor:
    """Probabilities -> ``{"labels": class map, "instances": instance map or None}``.

    Args:
        threshold: foreground probability threshold (binary models).
        opening_radius / fill_holes / min_size: clean-up of each foreground class (pixels).
        clean_classes: the classes that clean-up applies to (default every foreground class): e.g. ``[1, 2]``
            for the cellularity classes, leaving the 3 px boundary ring (class 3) as predicted.
        ring_class / ring_width: redraw class ``ring_class`` as a ring of ``ring_width`` px around the (cleaned)
            nuclei, as the cellularity masks draw their boundary class (:func:`draw_rings`); None: as predicted.
        instances: ``none``, ``connected`` (connected components), ``watershed`` (distance-transform
            watershed on the foreground, to split touching nuclei) or ``markers`` (marker-controlled watershed
            from instance-aware head outputs, see :func:`marker_watershed`).
        h / smooth: watershed marker h-maxima height (pixels of distance) and smoothing sigma.
        nuclei_classes: classes that count as nuclei for instances (default: every foreground class).
        marker_source / marker_threshold / min_marker_size: settings of ``markers`` mode.
        hv_ksize / hv_signed: the Sobel kernel and sign rule of the ``hv`` and ``interior_distance_hv`` marker
            sources (:func:`hv_edges`).
        render: ``mask`` (the cleaned class map as is) or ``disc``: each nucleus instance (connected components
            when ``instances`` is ``none``) is redrawn as a filled disc of ``disc_radius`` pixels at its
            centroid, in its majority class (:func:`render_discs`). For data whose ground truth is discs drawn at
            annotated points (BreCaHAD): the prediction then has the annotation's shape. Shape morphometry of
            rendered discs is meaningless (every nucleus is the same disc); counts and positions stay.

    Called with either a ``(K,H,W)`` probability array (single-head models) or a dict of maps from
    ``SegmentationTask.predict_maps`` (``fg``, ``probs``, ``interior``, ``dist``, ``hv``).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        opening_radius: int = 0,
        fill_holes: bool = False,
        min_size: int = 0,
        instances: str = "watershed",
        h: float = 1.0,
        smooth: float = 1.0,
        nuclei_classes: list[int] | None = None,
        marker_source: str = "interior",
        marker_threshold: float = 0.5,
        min_marker_size: int = 5,
        render: str = "mask",
        disc_radius: float | None = None,
        clean_classes: list[int] | None = None,
        ring_class: int | None = None,
        ring_width: int = 3,
        hv_ksize: int = 3,
        hv_signed: bool = False,
    ):
        if instances not in ("none", "connected", "watershed", "markers"):
            raise ValueError(f"instances must be none, connected, watershed or markers, got {instances!r}")
        if render not in ("mask", "disc"):
            raise ValueError(f"render must be mask or disc, got {render!r}")
        if render == "disc" and not (disc_radius is not None and float(disc_radius) > 0):
            raise ValueError(f"render=disc needs a positive disc_radius (pixels), got {disc_radius!r}")
        self.render = render
        self.disc_radius = None if disc_radius is None else float(disc_radius)
        self.marker_source, self.marker_threshold = marker_source, float(marker_threshold)
        self.min_marker_size = int(min_marker_size)
        self.threshold, self.opening_radius, self.fill_holes = float(threshold), int(opening_radius), bool(fill_holes)
        self.min_size, self.instances, self.h, self.smooth = int(min_size), instances, float(h), float(smooth)
        self.nuclei_classes = None if nuclei_classes is None else [int(c) for c in nuclei_classes]
        self.clean_classes = None if clean_classes is None else sorted(int(c) for c in clean_classes)
        if ring_class is not None and int(ring_width) < 1:
            raise ValueError(f"ring_class={ring_class} needs ring_width >= 1 pixel, got {ring_width!r}")
        self.ring_class = None if ring_class is None else int(ring_class)
        self.ring_width = int(ring_width)
        self.hv_ksize, self.hv_signed = int(hv_ksize), bool(hv_signed)
        _check_hv_ksize(self.hv_ksize)

    def config(self) -> dict:
        return {
            "threshold": self.threshold, "opening_radius": self.opening_radius, "fill_holes": self.fill_holes,
            "min_size": self.min_size, "instances": self.instances, "h": self.h, "smooth": self.smooth,
            "nuclei_classes": self.nuclei_classes, "marker_source": self.marker_source,
            "marker_threshold": self.marker_threshold, "min_marker_size": self.min_marker_size,
            "render": self.render, "disc_radius": self.disc_radius, "clean_classes": self.clean_classes,
            "ring_class": self.ring_class, "ring_width": self.ring_width, "hv_ksize": self.hv_ksize,
            "hv_signed": self.hv_signed,
        }

    def __call__(self, maps: np.ndarray | dict, cache: StageCache | None = None) -> dict[str, np.ndarray | None]:
        """``cache``: a :class:`StageCache` kept per image across calls with different settings (tuning): a
        stage whose inputs and settings did not change since the last call is reused, not recomputed."""
        if not isinstance(maps, dict):
            maps = {"probs": maps}
        src = maps["fg"][None] if "fg" in maps else maps["probs"]
        # nuclei_classes shapes the class map only through the rings (a grid over it reuses the class map otherwise)
        rings = None if self.ring_class is None else (self.ring_class, self.ring_width, tuple(self.nuclei_classes or ()))
        label_key = (self.threshold, self.opening_radius, self.fill_holes, self.min_size, self.clean_classes, rings)
        labels = _stage(cache, "labels", label_key, lambda: self._class_map(src))
        inst = None
        if self.instances != "none":
            fg = nucleus_pixels(labels, self.nuclei_classes)
            if self.instances == "connected":
                inst = ndi.label(fg)[0].astype(np.int32)
            elif self.instances == "watershed":
                dist = _stage(cache, "dist", (label_key, self.nuclei_classes, self.smooth),
                              lambda: smoothed_distance(fg, self.smooth))
                inst = distance_watershed(fg, self.h, self.smooth, self.min_size, dist=dist)
            else:
                inst = marker_watershed(fg, maps, self.marker_source, self.marker_threshold, self.min_marker_size,
                                        self.smooth, cache=cache, hv_ksize=self.hv_ksize, hv_signed=self.hv_signed)
                if self.min_size > 0:
                    inst = remove_small_instances(inst, self.min_size)
                if self.fill_holes:
                    inst = fill_instance_holes(inst)
                labels = (inst > 0).astype(np.uint8) if "fg" in maps else labels
        if self.render == "disc":
            nuclei = inst if inst is not None else ndi.label(nucleus_pixels(labels, self.nuclei_classes))[0].astype(np.int32)
            labels, discs = render_discs(labels, nuclei, self.disc_radius, self.nuclei_classes)
            inst = discs if inst is not None else None
        return {"labels": labels, "instances": inst}

    def _class_map(self, src: np.ndarray) -> np.ndarray:
        labels = clean_class_map(to_class_map(src, self.threshold), self.opening_radius, self.fill_holes,
                                 self.min_size, self.clean_classes)
        if self.ring_class is not None:
            labels = draw_rings(labels, self.ring_class, self.ring_width, self.nuclei_classes)
        return labels

    def with_params(self, **params) -> PostProcessor:
        """A copy with some settings replaced (used by threshold tuning)."""
        return PostProcessor(**{**self.config(), **params})


def draw_rings(labels: np.ndarray, ring_class: int, width: int, nuclei_classes: list[int] | None = None) -> np.ndarray:
    """Redraw class ``ring_class`` as the ``width``-pixel ring outside the nuclei (``nuclei_classes``, default
    every other foreground class), as the cellularity masks draw their boundary class (a disc ``width`` px wider
    than each nucleus disc, less the nuclei): the predicted ring pixels are dropped, nuclei stay as they are,
    and the ring covers only background."""
    labels = np.asarray(labels)
    nuclei = nucleus_pixels(labels, nuclei_classes) & (labels != ring_class)
    out = np.where(labels == ring_class, 0, labels).astype(labels.dtype)
    if not nuclei.any():
        return out
    # within width + 0.5 px of a nucleus pixel: matches the masks' discs of radius + width (a few pixels per ring)
    ring = (ndi.distance_transform_edt(~nuclei) <= width + 0.5) & ~nuclei & (out == 0)
    out[ring] = ring_class
    return out


def nucleus_pixels(labels: np.ndarray, nuclei_classes: list[int] | None = None) -> np.ndarray:
    """The pixels of a class map that count as nuclei: ``nuclei_classes``, default every foreground class."""
    return labels > 0 if nuclei_classes is None else np.isin(labels, nuclei_classes)


def render_discs(labels: np.ndarray, inst: np.ndarray, radius: float,
                 nuclei_classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Redraw every instance of ``inst`` as a filled disc of ``radius`` pixels centred at its centroid.

    The discs are rasterised as the BreCaHAD reader draws its ground truth (``draw_discs``, ``exact``: pixel
    centres within ``radius`` of the sub-pixel centroid; where discs overlap the later instance wins). Each
    disc takes the class that covers most of its instance in ``labels``. Nucleus pixels (``nuclei_classes``,
    default every foreground class) outside the discs become background; other classes stay.

    Returns ``(labels, instances)``, instances numbered 1..n in ``inst``'s id order (ids hidden by overlap vanish).
    """
    from histoseg.data.readers.common import draw_discs
    from histoseg.metrics.points import instance_centroids

    labels = np.asarray(labels)
    inst = np.asarray(inst)
    out = np.where(nucleus_pixels(labels, nuclei_classes), 0, labels).astype(labels.dtype)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if not ids.size:
        return out, np.zeros(inst.shape, np.int32)
    centres = instance_centroids(inst)  # (n, 2) xy, in the order of ids
    # majority class per instance: pixel counts of each class over each instance's pixels
    classes = np.unique(labels[inst > 0])
    classes = classes[classes > 0]
    if classes.size == 0:
        classes = np.array([1])
    counts = np.stack([ndi.sum(labels == k, inst, ids) for k in classes], axis=1)
    major = classes[np.argmax(counts, axis=1)]
    # one (class, xy) pair per instance, in id order, so overlaps resolve by id as the reader's drawing order does
    discs, disc_inst = draw_discs(inst.shape, [(int(k), c[None]) for k, c in zip(major, centres)], radius)
    drawn = disc_inst > 0
    out[drawn] = discs[drawn]
    return out, disc_inst


def fill_instance_holes(inst: np.ndarray) -> np.ndarray:
    """Fill holes inside each instance (a hole fully enclosed by nuclei joins the one on most of its border)."""
    return fill_class_holes(inst)
