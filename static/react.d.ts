/** TypeScript declaration of react.js; the types themselves are in realtime.d.ts. */
import type { TopicMap, UseRealtimeOptions, UseRealtimeResult } from "./realtime.js";

/**
 * Subscribe while mounted; re-render on every change of the subscription's snapshot. With
 * `channels`, one subscription whatever the set: channels that come are added, those gone removed.
 */
export declare function useRealtime<M extends TopicMap = Record<string, any>>(options: UseRealtimeOptions<M>): UseRealtimeResult<M>;
