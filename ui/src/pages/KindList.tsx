// Any other kind, live, with the columns the server prints for it (`flotilla get -o wide`).

import { useQuery } from "@tanstack/react-query";
import { pathOf, type ApiObject } from "../api/client";
import { useWatchedList } from "../api/useWatchedList";
import { age, ageValue, ErrorBox, Table, type Column } from "../components/Table";
import { token } from "../api/client";

/** "status.ips[0]" of an object. */
function at(o: any, path: string): unknown {
  let v = o;
  for (const part of path.split(".")) {
    const m = /^([^[]+)(?:\[(\d+)\])?$/.exec(part);
    if (!m || v === null || v === undefined) return undefined;
    v = v[m[1]];
    if (m[2] !== undefined) v = Array.isArray(v) ? v[Number(m[2])] : undefined;
  }
  return v;
}

function text(v: unknown): string {
  if (v === undefined || v === null) return "";
  if (Array.isArray(v)) return v.map(text).join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** The kind's printed columns: their titles and paths (from the server's Table definitions). */
function useColumns(plural: string, project: string | null) {
  return useQuery({
    queryKey: ["columns", plural],
    queryFn: async () => {
      const resp = await fetch(`${pathOf(plural, project)}?limit=1`, {
        headers: { Accept: "application/json;as=Table;v=v1;g=meta.k8s.io", Authorization: `Bearer ${token()}` },
      });
      if (!resp.ok) return [];
      const table = await resp.json();
      return (table.columnDefinitions ?? []).flatMap((d: any) => {
        const m = /\(([^()]+)\)$/.exec(d.description ?? "");
        return m ? [{ title: d.name as string, path: m[1], wide: d.priority > 0 }] : [];
      }) as { title: string; path: string; wide: boolean }[];
    },
    staleTime: Infinity,
  });
}

export function KindList({ plural, kind, project }: { plural: string; kind: string; project: string | null }) {
  const objects = useWatchedList(plural, project);
  const printed = useColumns(plural, project);
  const columns: Column[] = [
    { id: "name", title: "Name", value: (o: ApiObject) => o.metadata.name },
    ...(printed.data ?? []).map((c) => ({ id: c.path, title: c.title, value: (o: ApiObject) => text(at(o, c.path)), optional: c.wide })),
    { id: "age", title: "Age", value: ageValue, render: (o: ApiObject) => age(o.metadata.creationTimestamp) },
  ];
  return (
    <section>
      <div className="title">
        <h1>{kind}</h1>
      </div>
      <ErrorBox error={objects.error} />
      {objects.isLoading || printed.isLoading ? (
        <div className="loading">Loading…</div>
      ) : (
        <Table id={plural} columns={columns} rows={objects.data?.items ?? []} />
      )}
    </section>
  );
}
