/** TypeScript declaration of react.js; the types themselves are in realtime.d.ts. */
import type { TopicMap, UseRealtimeOptions, UseRealtimeResult } from "./realtime.js";

/** Subscribe while mounted; re-render on every change of the subscription's snapshot. */
export declare function useRealtime<M extends TopicMap = Record<string, any>>(options: UseRealtimeOptions<M>): UseRealtimeResult<M>;
