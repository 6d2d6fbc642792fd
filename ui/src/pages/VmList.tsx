// Virtual machines of a project, live: the columns of `flotilla get vms -o wide`, filter,
// sort, column chooser, and bulk power actions and deletion behind a confirmation.

import { useState } from "react";
import type { ApiObject } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { actOnAll, type VmAction } from "../api/vmActions";
import { Confirm } from "../components/Confirm";
import { age, ageValue, ErrorBox, Table, type Column } from "../components/Table";
import { Link } from "../router";

export function ips(vm: ApiObject): string {
  return ((vm.status?.ips ?? []) as unknown[]).filter((x) => typeof x === "string").join(", ");
}

export function Phase({ vm }: { vm: ApiObject }) {
  const phase = vm.metadata.deletionTimestamp ? "Deleting" : (vm.status?.phase ?? "Pending");
  return <span className={`phase phase-${phase.toLowerCase()}`}>{phase}</span>;
}

function columns(project: string): Column[] {
  return [
    {
      id: "name",
      title: "Name",
      value: (o) => o.metadata.name,
      render: (o) => <Link to={`/p/${project}/virtualmachines/${o.metadata.name}`}>{o.metadata.name}</Link>,
    },
    { id: "phase", title: "Phase", value: (o) => o.status?.phase ?? "Pending", render: (o) => <Phase vm={o} /> },
    { id: "node", title: "Node", value: (o) => o.status?.nodeName ?? o.spec?.nodeName ?? "" },
    { id: "ips", title: "IPs", value: ips },
    { id: "cpus", title: "CPUs", value: (o) => o.spec?.resources?.cpus ?? "" },
    { id: "memory", title: "Memory", value: (o) => o.spec?.resources?.memory ?? "" },
    { id: "age", title: "Age", value: ageValue, render: (o) => age(o.metadata.creationTimestamp) },
    { id: "power", title: "Power", value: (o) => o.spec?.powerState ?? "", optional: true },
    { id: "class", title: "Class", value: (o) => o.spec?.class ?? "", optional: true },
    { id: "image", title: "Image", value: (o) => o.spec?.image ?? "", optional: true },
  ];
}

const VERBS: Record<VmAction, string> = { start: "Start", stop: "Stop", restart: "Restart", delete: "Delete" };

export function VmList({ project }: { project: string }) {
  const vms = useWatchedList("virtualmachines", project);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [asking, setAsking] = useState<VmAction | null>(null);
  const [failures, setFailures] = useState<[string, string][]>([]);
  const names = [...selected].filter((n) => vms.data?.items.some((v) => v.metadata.name === n));
  const run = async (action: VmAction) => {
    setAsking(null);
    setFailures(await actOnAll(project, names, action));
    if (action === "delete") setSelected(new Set());
  };
  const actions = (
    <div className="bulk">
      {(Object.keys(VERBS) as VmAction[]).map((a) => (
        <button key={a} type="button" disabled={names.length === 0} className={a === "delete" ? "danger" : ""} onClick={() => setAsking(a)}>
          {VERBS[a]}
        </button>
      ))}
    </div>
  );
  return (
    <section>
      <div className="title">
        <h1>Virtual machines</h1>
        <Link to={`/p/${project}/virtualmachines/new`} className="button primary">
          Create VM
        </Link>
      </div>
      <ErrorBox error={vms.error} />
      {failures.length > 0 && (
        <div className="error" role="alert">
          {failures.map(([n, m]) => (
            <div key={n}>
              {n}: {m}
            </div>
          ))}
        </div>
      )}
      {vms.isLoading ? (
        <div className="loading">Loading…</div>
      ) : (
        <Table
          id="virtualmachines"
          columns={columns(project)}
          rows={vms.data?.items ?? []}
          selectable
          selected={selected}
          onSelect={setSelected}
          actions={actions}
          empty={
            <>
              No virtual machines in {project}. <Link to={`/p/${project}/virtualmachines/new`}>Create one</Link>.
            </>
          }
        />
      )}
      {asking && (
        <Confirm
          title={`${VERBS[asking]} ${names.length} virtual machine${names.length === 1 ? "" : "s"}?`}
          confirm={VERBS[asking]}
          danger={asking === "delete" || asking === "stop"}
          onConfirm={() => run(asking)}
          onCancel={() => setAsking(null)}
        >
          <p>{names.join(", ")}</p>
          {asking === "delete" && <p>Their disks, addresses and everything else they hold are freed. This cannot be undone.</p>}
        </Confirm>
      )}
    </section>
  );
}
