// Images of a project and their cache state on each node.

import type { ApiObject } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { age, ageValue, ErrorBox, Table, type Column } from "../components/Table";
import { human } from "../quantity";

function source(o: ApiObject): string {
  const s = o.spec?.source ?? {};
  return s.url ?? s.path ?? (s.upload !== undefined ? "upload" : Object.keys(s)[0] ?? "");
}

function nodes(o: ApiObject): [string, any][] {
  return Object.entries(o.status?.nodes ?? {});
}

const columns: Column[] = [
  { id: "name", title: "Name", value: (o) => o.metadata.name },
  { id: "format", title: "Format", value: (o) => o.spec?.format ?? "" },
  { id: "source", title: "Source", value: source },
  {
    id: "nodes",
    title: "Cached on nodes",
    value: (o) => nodes(o).map(([n, s]) => `${n} ${s.phase}`).join(" "),
    render: (o) => (
      <ul className="node-states">
        {nodes(o).map(([n, s]) => (
          <li key={n} title={s.message ?? ""}>
            <span className={`phase phase-${String(s.phase).toLowerCase()}`}>{s.phase}</span> {n}
            {s.sizeBytes ? ` (${human(s.sizeBytes)})` : ""}
          </li>
        ))}
        {nodes(o).length === 0 && <li className="hint">not on any node yet</li>}
      </ul>
    ),
  },
  { id: "age", title: "Age", value: ageValue, render: (o) => age(o.metadata.creationTimestamp) },
];

export function ImageList({ project }: { project: string }) {
  const images = useWatchedList("images", project);
  return (
    <section>
      <div className="title">
        <h1>Images</h1>
      </div>
      <ErrorBox error={images.error} />
      {images.isLoading ? (
        <div className="loading">Loading…</div>
      ) : (
        <Table id="images" columns={columns} rows={images.data?.items ?? []} empty={`No images in ${project}: flotilla image create or upload.`} />
      )}
    </section>
  );
}
