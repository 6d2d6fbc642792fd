// Nodes: readiness, capacity and what is allocated on each, their VMs, cordon and uncordon.

import { useState } from "react";
import { pathOf, request, type ApiObject } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { age, ageValue, ErrorBox, Table, type Column } from "../components/Table";
import { bytes, human } from "../quantity";
import { Link } from "../router";
import { Phase } from "./VmList";

function ready(n: ApiObject): string {
  const c = (n.status?.conditions ?? []).find((c: any) => c.type === "Ready");
  return c?.status === "True" ? "Ready" : "NotReady";
}

export function NodeList({ selected }: { selected?: string }) {
  const nodes = useWatchedList("nodes", null);
  // Every project's VMs: an admin's view (others see the nodes without them).
  const vms = useWatchedList("virtualmachines", null);
  const [error, setError] = useState<unknown>(null);
  const on = (node: string) => (vms.data?.items ?? []).filter((v) => (v.status?.nodeName ?? v.spec?.nodeName) === node);
  const used = (node: string) =>
    on(node).reduce(
      (sum, v) => ({ cpus: sum.cpus + Number(v.spec?.resources?.cpus ?? 0), memory: sum.memory + bytes(v.spec?.resources?.memory) }),
      { cpus: 0, memory: 0 },
    );
  const cordon = async (name: string, unschedulable: boolean) => {
    setError(null);
    try {
      await request("PATCH", pathOf("nodes", null, name), { spec: { unschedulable: unschedulable ? true : null } }, "application/merge-patch+json");
    } catch (e) {
      setError(e);
    }
  };
  const columns: Column[] = [
    { id: "name", title: "Name", value: (o) => o.metadata.name, render: (o) => <Link to={`/nodes/${o.metadata.name}`}>{o.metadata.name}</Link> },
    {
      id: "status",
      title: "Status",
      value: (o) => ready(o) + (o.spec?.unschedulable ? ",SchedulingDisabled" : ""),
      render: (o) => (
        <span className={`phase phase-${ready(o).toLowerCase()}`}>
          {ready(o)}
          {o.spec?.unschedulable ? " · cordoned" : ""}
        </span>
      ),
    },
    { id: "vms", title: "VMs", value: (o) => (vms.data ? on(o.metadata.name).length : "") },
    {
      id: "cpus",
      title: "CPUs (allocated / allocatable)",
      value: (o) => `${vms.data ? used(o.metadata.name).cpus : "?"} / ${o.status?.allocatable?.cpus ?? "?"}`,
    },
    {
      id: "memory",
      title: "Memory (allocated / allocatable)",
      value: (o) => `${vms.data ? human(used(o.metadata.name).memory) : "?"} / ${human(bytes(o.status?.allocatable?.memory))}`,
    },
    { id: "capacity", title: "Capacity", value: (o) => `${o.status?.capacity?.cpus ?? "?"} CPUs, ${human(bytes(o.status?.capacity?.memory))}`, optional: true },
    { id: "version", title: "Agent", value: (o) => o.status?.nodeInfo?.agentVersion ?? "", optional: true },
    { id: "hypervisor", title: "Hypervisor", value: (o) => `${o.status?.nodeInfo?.virtType ?? ""} ${o.status?.nodeInfo?.qemuVersion ?? ""}`, optional: true },
    { id: "age", title: "Age", value: ageValue, render: (o) => age(o.metadata.creationTimestamp) },
    {
      id: "actions",
      title: "",
      value: () => "",
      render: (o) =>
        o.spec?.unschedulable ? (
          <button type="button" onClick={() => cordon(o.metadata.name, false)}>
            Uncordon
          </button>
        ) : (
          <button type="button" onClick={() => cordon(o.metadata.name, true)}>
            Cordon
          </button>
        ),
    },
  ];
  const node = nodes.data?.items.find((n) => n.metadata.name === selected);
  return (
    <section>
      <div className="title">
        <h1>Nodes</h1>
      </div>
      <ErrorBox error={nodes.error ?? error} />
      {nodes.isLoading ? <div className="loading">Loading…</div> : <Table id="nodes" columns={columns} rows={nodes.data?.items ?? []} empty="No nodes have joined yet: run flotilla agent on a host." />}
      {node && (
        <div className="detail">
          <h2>{node.metadata.name}</h2>
          <dl>
            {Object.entries(node.status?.nodeInfo ?? {})
              .filter(([k]) => !k.startsWith("agentCert"))
              .map(([k, v]) => (
                <div key={k}>
                  <dt>{k}</dt>
                  <dd>{String(v)}</dd>
                </div>
              ))}
          </dl>
          <h3>Conditions</h3>
          <ul>
            {(node.status?.conditions ?? []).map((c: any) => (
              <li key={c.type}>
                {c.type}: {c.status} {c.reason ? `(${c.reason})` : ""} {c.message}
              </li>
            ))}
          </ul>
          <h3>Virtual machines</h3>
          <ul>
            {on(node.metadata.name).map((v) => (
              <li key={`${v.metadata.namespace}/${v.metadata.name}`}>
                <Link to={`/p/${v.metadata.namespace}/virtualmachines/${v.metadata.name}`}>
                  {v.metadata.namespace}/{v.metadata.name}
                </Link>{" "}
                <Phase vm={v} />
              </li>
            ))}
          </ul>
        </div>
      )}
    </section>
  );
}
