"""The OOD gauge of the module panel: a Qt widget that paints ``ood_gauge.gauge_layout`` (the geometry,
colours and words are computed in the core, where they are tested without Qt)."""

from __future__ import annotations

from typing import Optional

import qt

from MultiTaskSegLib.ood_gauge import gauge_layout


class OODGaugeWidget(qt.QWidget):
    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self.layoutInfo = None
        self.setMinimumHeight(56)

    def setResult(self, score: float, threshold: Optional[float], context: str) -> None:
        self.layoutInfo = gauge_layout(score, float("inf") if threshold is None else threshold, context)
        self.setToolTip(self.layoutInfo.score_text)
        self.update()

    def clear(self) -> None:
        self.layoutInfo = None
        self.update()

    def paintEvent(self, event) -> None:
        info = self.layoutInfo
        if info is None:
            return
        painter = qt.QPainter(self)
        try:
            margin, barTop, barHeight = 6, 4, 14
            width = self.width - 2 * margin
            for band in info.bands:
                painter.fillRect(
                    qt.QRectF(margin + band.start * width, barTop, (band.end - band.start) * width, barHeight),
                    qt.QColor(*band.color),
                )
            painter.setPen(qt.QPen(qt.QColor(0, 0, 0), 2))
            x = margin + info.threshold_position * width
            painter.drawLine(qt.QLineF(x, barTop - 3, x, barTop + barHeight + 3))  # threshold marker
            x = margin + info.score_position * width
            painter.setBrush(qt.QBrush(qt.QColor(30, 30, 30)))
            painter.drawPolygon(
                qt.QPolygonF(
                    [
                        qt.QPointF(x, barTop + barHeight),
                        qt.QPointF(x - 6, barTop + barHeight + 9),
                        qt.QPointF(x + 6, barTop + barHeight + 9),
                    ]
                )
            )  # score pointer
            painter.setPen(self.palette.color(qt.QPalette.WindowText))
            text = info.score_text + (f" — {info.context_text}" if info.context_text else "")
            painter.drawText(qt.QRectF(margin, barTop + barHeight + 12, width, 18), qt.Qt.AlignLeft, text)
        finally:
            painter.end()
