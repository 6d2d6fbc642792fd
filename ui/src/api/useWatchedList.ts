// A collection kept live: listed once, then patched from the API's watch stream into the
// query cache, so every view of it updates without a reload. A broken or expired watch
// lists again and resumes from there.

import { useEffect } from "react";
import { useQuery, useQueryClient } from "@tanstack/react-query";
import { ApiError, list, watch, GROUP, type ApiObject, type List } from "./client";

export function listKey(plural: string, project: string | null, group = GROUP) {
  return ["list", group, plural, project ?? ""] as const;
}

function byName(a: ApiObject, b: ApiObject) {
  return a.metadata.name < b.metadata.name ? -1 : a.metadata.name > b.metadata.name ? 1 : 0;
}

function apply(current: List, type: string, object: ApiObject): List {
  const rv = object.metadata.resourceVersion ?? current.resourceVersion;
  if (type === "BOOKMARK") return { ...current, resourceVersion: rv };
  const key = `${object.metadata.namespace ?? ""}/${object.metadata.name}`;
  const items = current.items.filter((o) => `${o.metadata.namespace ?? ""}/${o.metadata.name}` !== key);
  if (type !== "DELETED") {
    items.push(object);
    items.sort(byName);
  }
  return { items, resourceVersion: rv };
}

export function useWatchedList(plural: string, project: string | null, group = GROUP) {
  const client = useQueryClient();
  const key = listKey(plural, project, group);
  const query = useQuery({
    queryKey: key,
    queryFn: async () => {
      const l = await list(plural, project, group);
      return { ...l, items: [...l.items].sort(byName) };
    },
    staleTime: Infinity,
    retry: (failures, error) => !(error instanceof ApiError && error.code < 500) && failures < 3,
  });
  const listed = query.data !== undefined;
  useEffect(() => {
    if (!listed) return;
    const stop = new AbortController();
    (async () => {
      let backoff = 500;
      while (!stop.signal.aborted) {
        const from = client.getQueryData<List>(key)?.resourceVersion ?? "0";
        try {
          await watch(
            plural,
            project,
            from,
            (event) => {
              if (event.type === "ERROR") throw new ApiError(event.object.code ?? 500, "", event.object.message ?? "");
              client.setQueryData<List>(key, (old) => (old ? apply(old, event.type, event.object) : old));
            },
            stop.signal,
            group,
          );
          backoff = 500;
        } catch (e) {
          if (stop.signal.aborted) return;
          // Too old a version (410): list again, then follow from the new one.
          if (e instanceof ApiError && (e.code === 410 || e.code === 500)) {
            await client.refetchQueries({ queryKey: key, exact: true });
          } else if (e instanceof ApiError && e.code < 500) {
            return;
          }
          await new Promise((r) => setTimeout(r, backoff));
          backoff = Math.min(backoff * 2, 10_000);
        }
      }
    })();
    return () => stop.abort();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [listed, plural, project, group]);
  return query;
}
