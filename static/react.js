/**
 * react.js: `useRealtime`, a React hook over realtime.js (issue 12).
 *
 *     import { useRealtime } from "/static/react.js";
 *
 *     function RunProgress({ runId }) {
 *       const { state, latestByTopic, messages, runStatus, error } = useRealtime({
 *         channel: `run.${runId}`,
 *         topics: ["status", "log", "run"],
 *         token: fetchToken,      // as for subscribe(): a string, or a function returning a token or grant
 *         closeOnRunEnd: true,    // every other option of subscribe() passes through
 *       });
 *       ...
 *     }
 *
 * It returns the subscription's `snapshot`: {state, latest, latestByTopic, messages, runStatus,
 * error, texts}, and lastEventId, lastReset, retryAt and channels (see realtime.js). A new channel
 * or new topics mean a new subscription; unmounting closes the stream. Types: realtime.d.ts, react.d.ts.
 *
 * Several channels on one stream: `useRealtime({channels: {"run.1": [...], "run.2": [...]}, token})`
 * and read `channels["run.1"].runStatus`. A new `channels` object does not replace the
 * subscription: the channels that came are added (from their start), those gone are removed.
 *
 * No build step here: this module does
 *     import { useEffect, useMemo, useRef, useSyncExternalStore } from "react";
 * so your bundler, or an import map naming "react", supplies your copy of React.
 */
import { useEffect, useMemo, useRef, useSyncExternalStore } from "react";
import { subscribe } from "./realtime.js";

// What a component shows before its subscription exists: the first render, and on the server.
// Constant, because useSyncExternalStore compares snapshots by identity.
const NOT_YET_SUBSCRIBED = Object.freeze({
  state: "connecting",
  error: null,
  lastEventId: null,
  latest: null,
  latestByTopic: Object.freeze({}),
  messages: Object.freeze([]),
  runStatus: null,
  lastReset: null,
  retryAt: null,
  texts: Object.freeze({}),
  channels: Object.freeze({}),
});

/** Subscribe while mounted; re-render on every change of the subscription's snapshot. */
export function useRealtime({ channel, topics, channels, ...options }) {
  // The token function and callbacks are often new arrows on every render: the subscription
  // calls the latest ones rather than being replaced each time.
  const latestOptions = useRef(options);
  useEffect(() => {
    latestOptions.current = options;
  });
  // Compared by value: `topics={["status", "log"]}` is a new array on every render. Several
  // channels share one subscription whatever the set: it changes by add() and remove().
  const several = channels !== undefined;
  const wanted = useRef(channels);
  wanted.current = channels;
  const key = several ? "channels" : JSON.stringify([channel, topics]);
  const store = useMemo(
    () => subscriptionStore(() => (several ? { channels: wanted.current } : { channel, topics }), latestOptions),
    [key],
  );
  const channelsKey = JSON.stringify(channels ?? null);
  useEffect(() => store.setChannels(wanted.current), [store, channelsKey]);
  return useSyncExternalStore(store.listen, store.getSnapshot, store.getSnapshot);
}

/**
 * A store in useSyncExternalStore's terms for one channel and topics, or a set of channels.
 * React calls `listen` after the component mounts (twice in StrictMode, closing the first) and
 * its cleanup on unmount or when the key changes, so the stream lives exactly as long as a
 * mounted component.
 */
function subscriptionStore(target, latestOptions) {
  let subscription = null;
  return {
    listen(onStoreChange) {
      subscription = subscribe({ ...callingLatest(latestOptions), ...target() });
      const stopListening = subscription.onChange(onStoreChange);
      const closing = subscription;
      return () => {
        stopListening();
        closing.close();
        if (subscription === closing) subscription = null;
      };
    },
    /** Several channels: bring the subscription's set to `channels` (those new start from their start). */
    setChannels(channels) {
      if (!subscription || channels === undefined) return;
      for (const name of Object.keys(subscription.channels)) if (!(name in channels)) subscription.remove(name);
      for (const [name, topics] of Object.entries(channels)) {
        // A channel already there (even ended by closeOnRunEnd) stays as it is, unless its topics changed.
        const view = subscription.channels[name];
        if (!view || JSON.stringify(view.topics) !== JSON.stringify(topics)) subscription.add(name, topics);
      }
    },
    // `snapshot` is replaced on every change and only then: stable between changes, as React requires.
    getSnapshot: () => subscription?.snapshot ?? NOT_YET_SUBSCRIBED,
  };
}

/** The options as they are now, with each function option (token, onMessage...) calling the latest one. */
function callingLatest(latestOptions) {
  const options = { ...latestOptions.current };
  for (const [name, value] of Object.entries(options)) {
    if (typeof value === "function") options[name] = (...args) => latestOptions.current[name]?.(...args);
  }
  return options;
}
