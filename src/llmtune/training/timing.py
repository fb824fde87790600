"""Wall time of a run's phases, for metrics.json and the report."""

import time


class Stopwatch:
    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """Seconds since the previous lap, recorded under name."""
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now
        return self.times[name]

    def laps(self) -> dict[str, float]:
        """Each phase and the total so far, rounded to 0.1 s."""
        total = time.perf_counter() - self.started
        return {**{k: round(v, 1) for k, v in self.times.items()}, "total": round(total, 1)}
