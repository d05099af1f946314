"""The report of `make bench`: the markdown table and the verdict on each target."""
from __future__ import annotations

import math


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(report: dict) -> str:
    lines = [
        f"database: {report['database']}, load average at start {report['loadavg_start']}, at end {report['loadavg_end']}, "
        f"{report['cpus']} CPUs, {report['client_procs']} client processes",
    ]
    if report["phases"]:
        lines += [
            "",
            "| phase | subs | msgs | msg/s | p50 ms | p95 ms | p99 ms | max ms | deliveries/s | reads/msg "
            "| exactly once, in order | server CPU | client CPU (per proc) | publisher CPU | machine busy "
            "| server µs/delivery | first sub p50/p99 ms | fan-out spread p50/p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in report["phases"]:
        check = r["exactly_once_in_order"]
        latency = r["latency_ms"]
        cpu = r["cpu"]
        lines.append(
            f"| {r['phase']} | {r['subscribers']} | {r['published']} | {r['publish_rate_per_s']} "
            f"| {fmt(latency['p50'])} | {fmt(latency['p95'])} | {fmt(latency['p99'])} | {fmt(latency['max'])} "
            f"| {r['deliveries_per_s']} | {r['reads_per_message']} "
            f"| {check['complete']}/{check['subscribers']} (missing {check['missing']}, dup {check['duplicates']}, "
            f"closed {check['closed_streams']}) "
            f"| {cpu['server_worker_pct']}% | {' + '.join(f'{p}%' for p in cpu['client_procs_pct'])} "
            f"| {cpu['publisher_pct']}% | {cpu['machine_busy_pct']}% | {cpu['server_us_per_delivery']} "
            f"| {fmt(r['per_message_ms']['first_subscriber_p50'])}/{fmt(r['per_message_ms']['first_subscriber_p99'])} "
            f"| {fmt(r['per_message_ms']['fan_out_spread_p50'])}/{fmt(r['per_message_ms']['fan_out_spread_p99'])} |"
        )
    memory = report.get("memory")
    if memory:
        lines += [
            "",
            "| idle streams | opened | stats streams | RSS before | RSS after | per stream | open time | server CPU while opening |",
            "|---|---|---|---|---|---|---|---|",
            f"| {memory['idle_streams']} | {memory['opened']['ready']} | {memory['stats_streams']} "
            f"| {memory['rss_before_kib'] / 1024:.1f} MiB | {memory['rss_after_kib'] / 1024:.1f} MiB "
            f"| {memory['kib_per_stream']} KiB | {memory['open_s']} s | {memory['cpu_while_opening']['server_worker_pct']}% |",
        ]
    storms = [s for s in (report.get("storm"), report.get("storm_2_workers")) if s]
    if storms:
        lines += [
            "",
            "| reconnect storm | workers | behind | caught up | all caught up after | replay reads | publish p50/p99 meanwhile | exactly once, in order |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for storm in storms:
            check = storm["exactly_once_in_order"]
            lines.append(
                f"| {storm['streams']} streams, one cursor | {storm['workers']} | {storm['behind']} msgs "
                f"| {storm['caught_up']}/{storm['opened']} | {storm['caught_up_s']} s | {storm['replay_reads']} "
                f"| {storm['publish_during_ms']['p50']}/{storm['publish_during_ms']['p99']} ms "
                f"| {check['complete']}/{check['subscribers']} |"
            )
    publish = report.get("publish")
    if publish:
        lines += [
            "",
            "| publishing, 4 processes, PostgreSQL | messages/s | machine busy |",
            "|---|---|---|",
        ] + [
            f"| round {i + 1}: raw INSERT+COMMIT / realtime.publish() | {r['raw']['per_s']:,} / {r['publish']['per_s']:,} "
            f"(ratio {r['ratio']}) | {r['raw']['machine_busy_pct']}% / {r['publish']['machine_busy_pct']}% |"
            for i, r in enumerate(publish["rounds"])
        ] + [
            f"| raw INSERT of {report['args']['batch']} rows + COMMIT / publish_many() x {report['args']['batch']} "
            f"| {publish['raw_batch']['per_s']:,} / {publish['batch']['per_s']:,} "
            f"(ratio {publish['ratio_batch_to_raw_batch']}) "
            f"| {publish['raw_batch']['machine_busy_pct']}% / {publish['batch']['machine_busy_pct']}% |",
        ]
    scale = report.get("scale")
    if scale:
        check, latency = scale["exactly_once_in_order"], scale["latency_ms"]
        lines += [
            "",
            "| scale | opened | per idle stream | p50 / p99 / max ms | deliveries/s | exactly once, in order "
            "| workers CPU | client CPU (per proc) | machine busy |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {scale['streams']} streams, {scale['channels']} channels, {scale['workers']} workers, 1 msg/s each "
            f"| {scale['opened']['ready']} in {scale['open_s']} s | {scale['kib_per_stream']} KiB "
            f"| {fmt(latency['p50'])} / {fmt(latency['p99'])} / {fmt(latency['max'])} | {scale['deliveries_per_s']} "
            f"| {check['complete']}/{check['subscribers']} (missing {check['missing']}, dup {check['duplicates']}) "
            f"| {' + '.join(f'{p}%' for p in scale['server_workers_pct'])} "
            f"| {' + '.join(f'{p}%' for p in scale['client_procs_pct'])} | {scale['machine_busy_pct']}% |",
        ]
    stall = report.get("stall")
    if stall:
        b, a = stall["b_exactly_once_in_order"], stall["a_exactly_once_in_order"]
        latency, while_open = stall["b_latency_ms"], stall["b_while_open"]
        during = while_open["latency_ms"] or {}
        lines += [
            "",
            "| stall: A's transaction open | B streams | B msgs | B p50 / p99 / max ms "
            "| B while it was open: msgs, p50 / p99 / max ms | B exactly once, in order "
            "| A streams: first / last message after the commit, ms | A exactly once, in order | A's message stored |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {fmt(stall['open_s'], 2)} s, {stall['rate']:g} msg/s on B | {stall['streams']} | {stall['published']} "
            f"| {fmt(latency['p50'])} / {fmt(latency['p99'])} / {fmt(latency['max'])} "
            f"| {while_open['messages']}: {fmt(during.get('p50'))} / {fmt(during.get('p99'))} / {fmt(during.get('max'))} "
            f"| {b['complete']}/{b['subscribers']} (missing {b['missing']}, dup {b['duplicates']}) "
            f"| {stall['a_first_after_commit_ms']} / {fmt(stall['a_after_commit_ms']['max'])} "
            f"| {a['complete']}/{a['subscribers']} (missing {a['missing']}, dup {a['duplicates']}) "
            f"| {'yes' if stall['a_stored'] else 'NO'} |",
        ]
    lines += ["", "targets:"] + [f"- {t}" for t in report["targets"]]
    return "\n".join(lines)


def targets(report: dict) -> list[str]:
    verdicts = []
    by_name = {r["phase"]: r for r in report["phases"]}
    fanout = by_name.get("fanout")
    if fanout:
        p99 = fanout["latency_ms"]["p99"]
        verdicts.append(f"p99 < 100 ms at {fanout['subscribers']} subscribers: {p99} ms -> {'MET' if p99 < 100 else 'MISSED'}")
        check = fanout["exactly_once_in_order"]
        ok = check["complete"] == check["subscribers"]
        verdicts.append(f"every subscriber got every message once, in order: {'YES' if ok else 'NO'}")
    if fanout and "reads/1" in by_name:
        # The target is that reads do not grow with subscribers. Fewer is possible:
        # when the worker lags, several NOTIFYs (or polls) are covered by one read.
        one, many = by_name["reads/1"]["reads_per_message"], fanout["reads_per_message"]
        ok = many <= one * 1.1 + 0.02
        note = " (fewer: one read covered several messages while the worker lagged)" if many < one * 0.9 else ""
        verdicts.append(
            f"reads/message do not grow from 1 to {fanout['subscribers']} subscribers: {one} vs {many}"
            f" -> {'MET' if ok else 'MISSED'}{note}"
        )
    for storm in (report.get("storm"), report.get("storm_2_workers")):
        if storm:
            ok = storm["caught_up_s"] < 5 and storm["publish_during_ms"]["p99"] < 100
            verdicts.append(
                f"storm of {storm['streams']} on {storm['workers']} worker(s): caught up in {storm['caught_up_s']} s (< 5), "
                f"publish p99 {storm['publish_during_ms']['p99']} ms (< 100) -> {'MET' if ok else 'MISSED'}"
            )
    publish = report.get("publish")
    if publish:
        ratio = publish["ratio_publish_to_raw"]
        verdicts.append(f"publish >= 0.8 of raw INSERT+COMMIT: {ratio} -> {'MET' if ratio >= 0.8 else 'MISSED'}")
        rate, raw = publish["batch"]["per_s"], publish["raw_batch"]["per_s"]
        verdicts.append(f"batch publish >= 50,000 messages/s: {rate:,} (raw batch INSERT on this machine: {raw:,}/s)"
                        f" -> {'MET' if rate >= 50_000 else 'MISSED'}")
    scale = report.get("scale")
    if scale:
        p99, per = scale["latency_ms"]["p99"], scale["kib_per_stream"]
        check = scale["exactly_once_in_order"]
        ok = p99 is not None and p99 < 200 and check["complete"] == check["subscribers"] == scale["streams"]
        verdicts.append(f"{scale['streams']} streams on {scale['workers']} workers: p99 {p99} ms (< 200), every stream "
                        f"complete {check['complete']}/{scale['streams']} -> {'MET' if ok else 'MISSED'}")
        verdicts.append(f"<= 16 KiB per idle stream at {scale['streams']}: {per} KiB -> {'MET' if per <= 16 else 'MISSED'}")
    stall = report.get("stall")
    if stall:
        during = (stall["b_while_open"]["latency_ms"] or {}).get("p99")
        b, a = stall["b_exactly_once_in_order"], stall["a_exactly_once_in_order"]
        ok = during is not None and during < 100 and b["complete"] == b["subscribers"] == stall["streams"]
        verdicts.append(f"channel B while channel A's transaction is open {stall['open_s']} s: p99 {during} ms (< 100), "
                        f"every B stream complete {b['complete']}/{stall['streams']} -> {'MET' if ok else 'MISSED'}")
        ok = (stall["a_first_after_commit_ms"] >= 0 and a["complete"] == a["subscribers"] == stall["a_streams"]
              and stall["a_stored"])
        verdicts.append(f"channel A's messages after its commit, once, in order, stored: {a['complete']}/{a['subscribers']}"
                        f" streams, first {stall['a_first_after_commit_ms']} ms after the commit -> {'YES' if ok else 'NO'}")
    memory = report.get("memory")
    if memory:
        per = memory["kib_per_stream"]
        ok = per * 1024 < 50_000 and memory["stats_streams"] == memory["idle_streams"]
        verdicts.append(f"< 50 KB per idle stream at {memory['idle_streams']}: {per} KiB ({per * 1.024:.1f} KB) -> {'MET' if ok else 'MISSED'}")
    for r in report["phases"]:
        busiest = max(r["cpu"]["client_procs_pct"], default=0)
        if busiest > 70:
            verdicts.append(f"WARNING {r['phase']}: a client process used {busiest}% of a core; add --client-procs")
    return verdicts
