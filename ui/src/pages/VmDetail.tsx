// One VM: overview, events, serial log, the serial console and VNC, each tab its own URL;
// and its day-2 actions.

import { lazy, Suspense, useEffect, useState } from "react";
import { useQuery } from "@tanstack/react-query";
import { pathOf, request, token, type ApiObject } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { act, type VmAction } from "../api/vmActions";
import { Confirm } from "../components/Confirm";
import { age, ErrorBox } from "../components/Table";
import { Link, navigate } from "../router";
import { ips, Phase } from "./VmList";

const SerialConsole = lazy(() => import("../components/SerialConsole"));
const VncConsole = lazy(() => import("../components/VncConsole"));

const TABS: [string, string][] = [
  ["overview", "Overview"],
  ["events", "Events"],
  ["log", "Serial log"],
  ["console", "Console"],
  ["vnc", "VNC"],
];

export function VmDetail({ project, name, tab }: { project: string; name: string; tab: string }) {
  // The project's list is watched already (or soon): one stream feeds every view of it.
  const vms = useWatchedList("virtualmachines", project);
  const vm = vms.data?.items.find((v) => v.metadata.name === name);
  const [asking, setAsking] = useState<VmAction | null>(null);
  const [error, setError] = useState<unknown>(null);
  const base = `/p/${project}/virtualmachines/${name}`;
  const run = async (action: VmAction) => {
    setAsking(null);
    setError(null);
    try {
      await act(project, name, action);
      if (action === "delete") navigate(`/p/${project}/virtualmachines`);
    } catch (e) {
      setError(e);
    }
  };
  if (vms.isLoading) return <div className="loading">Loading…</div>;
  if (!vm) {
    return (
      <section>
        <h1>{name}</h1>
        <div className="error" role="alert">
          VirtualMachine {JSON.stringify(name)} not found in project {project}.
        </div>
        <Link to={`/p/${project}/virtualmachines`}>All virtual machines</Link>
      </section>
    );
  }
  const running = vm.spec?.powerState === "Running";
  return (
    <section>
      <div className="title">
        <h1>
          {name} <Phase vm={vm} />
        </h1>
        <div className="actions">
          <button type="button" disabled={running} onClick={() => run("start")}>
            Start
          </button>
          <button type="button" disabled={!running} onClick={() => setAsking("stop")}>
            Stop
          </button>
          <button type="button" disabled={!running} onClick={() => setAsking("restart")}>
            Restart
          </button>
          <button type="button" className="danger" onClick={() => setAsking("delete")}>
            Delete
          </button>
        </div>
      </div>
      <ErrorBox error={error} />
      <div className="tabs" role="tablist">
        {TABS.map(([id, title]) => (
          <Link key={id} to={`${base}/${id}`} role="tab" aria-selected={tab === id} className={tab === id ? "active" : ""}>
            {title}
          </Link>
        ))}
      </div>
      <div className="tab">
        {tab === "overview" && <Overview vm={vm} project={project} />}
        {tab === "events" && <Events project={project} name={name} />}
        {tab === "log" && <SerialLog project={project} name={name} />}
        <Suspense fallback={<div className="loading">Loading…</div>}>
          {tab === "console" && <SerialConsole project={project} name={name} />}
          {tab === "vnc" && <VncConsole project={project} name={name} />}
        </Suspense>
        {!TABS.some(([id]) => id === tab) && <div className="error">No tab {JSON.stringify(tab)}.</div>}
      </div>
      {asking && (
        <Confirm
          title={`${asking[0].toUpperCase() + asking.slice(1)} ${name}?`}
          confirm={asking[0].toUpperCase() + asking.slice(1)}
          danger={asking !== "restart"}
          onConfirm={() => run(asking)}
          onCancel={() => setAsking(null)}
        >
          {asking === "delete" ? <p>Its disks, addresses and everything else it holds are freed. This cannot be undone.</p> : <p>The guest is asked to shut down first.</p>}
        </Confirm>
      )}
    </section>
  );
}

function Overview({ vm, project }: { vm: ApiObject; project: string }) {
  const spec = vm.spec ?? {};
  const status = vm.status ?? {};
  return (
    <div className="overview">
      <dl>
        <dt>Phase</dt>
        <dd>
          <Phase vm={vm} />
        </dd>
        <dt>Power</dt>
        <dd>{spec.powerState}</dd>
        <dt>Node</dt>
        <dd>{status.nodeName ? <Link to={`/nodes/${status.nodeName}`}>{status.nodeName}</Link> : "not scheduled yet"}</dd>
        <dt>IPs</dt>
        <dd>{ips(vm) || "none yet"}</dd>
        <dt>CPUs / memory</dt>
        <dd>
          {spec.resources ? `${spec.resources.cpus} / ${spec.resources.memory}` : "from its class"}
        </dd>
        <dt>Class</dt>
        <dd>
          <ChangeClass vm={vm} project={project} />
        </dd>
        <dt>Image</dt>
        <dd>{spec.image ?? (spec.boot ? `kernel ${spec.boot.kernel}` : "none")}</dd>
        <dt>Networks</dt>
        <dd>{(spec.networks ?? []).map((n: any) => n.network).join(", ") || "none"}</dd>
        <dt>Created</dt>
        <dd>{age(vm.metadata.creationTimestamp)} ago</dd>
      </dl>
      <h2>Conditions</h2>
      <table>
        <thead>
          <tr>
            <th>Type</th>
            <th>Status</th>
            <th>Reason</th>
            <th>Message</th>
            <th>Since</th>
          </tr>
        </thead>
        <tbody>
          {(status.conditions ?? []).map((c: any) => (
            <tr key={c.type}>
              <td>{c.type}</td>
              <td>{c.status}</td>
              <td>{c.reason}</td>
              <td>{c.message}</td>
              <td>{age(c.lastTransitionTime)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>Spec</h2>
      <pre className="yaml">{JSON.stringify(spec, null, 2)}</pre>
    </div>
  );
}

/** The class, changeable while the VM is stopped (CPUs and memory come from it). */
function ChangeClass({ vm, project }: { vm: ApiObject; project: string }) {
  const classes = useWatchedList("vmclasses", null);
  const [error, setError] = useState<unknown>(null);
  const stopped = vm.spec?.powerState === "Stopped" && vm.status?.phase === "Stopped";
  const current = vm.spec?.class ?? "";
  if (!stopped) return <span title="Stop the VM to change its class">{current || "none"}</span>;
  const change = async (value: string) => {
    setError(null);
    try {
      await request("PATCH", pathOf("virtualmachines", project, vm.metadata.name), { spec: { class: value, resources: null } }, "application/merge-patch+json");
    } catch (e) {
      setError(e);
    }
  };
  return (
    <>
      <select aria-label="Class" value={current} onChange={(e) => change(e.target.value)}>
        {!current && <option value="">none</option>}
        {(classes.data?.items ?? []).map((c) => (
          <option key={c.metadata.name} value={c.metadata.name}>
            {c.metadata.name} ({c.spec?.cpus} CPUs, {c.spec?.memory})
          </option>
        ))}
      </select>
      <ErrorBox error={error} />
    </>
  );
}

function Events({ project, name }: { project: string; name: string }) {
  const events = useQuery({
    queryKey: ["events", project, name],
    queryFn: () =>
      request(
        "GET",
        `/api/v1/namespaces/${encodeURIComponent(project)}/events?fieldSelector=${encodeURIComponent(
          `involvedObject.kind=VirtualMachine,involvedObject.name=${name}`,
        )}`,
      ),
    refetchInterval: 3000,
  });
  const items = [...(events.data?.items ?? [])].sort((a: any, b: any) =>
    String(b.lastTimestamp ?? "").localeCompare(String(a.lastTimestamp ?? "")),
  );
  return (
    <>
      <ErrorBox error={events.error} />
      <table className="events">
        <thead>
          <tr>
            <th>Last seen</th>
            <th>Type</th>
            <th>Reason</th>
            <th>From</th>
            <th>Message</th>
          </tr>
        </thead>
        <tbody>
          {items.map((e: any) => (
            <tr key={e.metadata.name}>
              <td>{age(e.lastTimestamp)}</td>
              <td>{e.type}</td>
              <td>{e.reason}</td>
              <td>{e.source?.component ?? e.reportingComponent}</td>
              <td>
                {e.message}
                {e.count > 1 ? ` (×${e.count})` : ""}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {items.length === 0 && !events.isLoading && <div className="empty">No events.</div>}
    </>
  );
}

/** The serial console's log, followed as it grows (the last 256 KiB kept). */
function SerialLog({ project, name }: { project: string; name: string }) {
  const [text, setText] = useState("");
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    const stop = new AbortController();
    (async () => {
      try {
        const resp = await fetch(`${pathOf("virtualmachines", project, name)}/log?follow=true`, {
          headers: { Authorization: `Bearer ${token()}` },
          signal: stop.signal,
        });
        if (!resp.ok || !resp.body) {
          const body = await resp.text();
          try {
            setError(JSON.parse(body).message);
          } catch {
            setError(body || resp.statusText);
          }
          return;
        }
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          setText((t) => (t + value).slice(-256 * 1024));
        }
      } catch (e: any) {
        if (!stop.signal.aborted) setError(String(e.message ?? e));
      }
    })();
    return () => stop.abort();
  }, [project, name]);
  return (
    <>
      {error && (
        <div className="error" role="alert">
          {error}
        </div>
      )}
      <pre className="log" data-testid="serial-log">
        {text}
      </pre>
    </>
  );
}
