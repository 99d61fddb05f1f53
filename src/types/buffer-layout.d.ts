// Types for the parts of buffer-layout (no @types package exists) that our on-disk and
// control-block formats use. A Layout encodes a plain object into a Buffer at an offset
// and decodes it back; `span` is its size in bytes (-1 when variable).
declare module 'buffer-layout' {
  export class Layout<T = unknown> {
    readonly span: number;
    readonly property: string | undefined;
    decode(b: Buffer, offset?: number): T;
    encode(src: T, b: Buffer, offset?: number): number;
    getSpan(b?: Buffer, offset?: number): number;
    replicate(property: string): Layout<T>;
  }
  export class Structure<T = Record<string, unknown>> extends Layout<T> {
    readonly fields: Layout[];
    offsetOf(property: string): number | undefined;
    layoutFor(property: string): Layout | undefined;
  }
  export class Sequence<T = unknown> extends Layout<T[]> {}
  export class Blob extends Layout<Buffer> {}
  export function struct<T = Record<string, unknown>>(fields: Layout<any>[], property?: string, decodePrefixes?: boolean): Structure<T>;
  export function seq<T>(elementLayout: Layout<T>, count: number | Layout<number>, property?: string): Sequence<T>;
  export function blob(length: number | Layout<number>, property?: string): Blob;
  export function cstr(property?: string): Layout<string>;
  export function utf8(maxSpan?: number, property?: string): Layout<string>;
  export function greedy(elementSpan?: number, property?: string): Layout<number>;
  export function offset<T>(layout: Layout<T>, offset?: number, property?: string): Layout<T>;
  export function u8(property?: string): Layout<number>;
  export function u16(property?: string): Layout<number>;
  export function u24(property?: string): Layout<number>;
  export function u32(property?: string): Layout<number>;
  export function u48(property?: string): Layout<number>;
  export function nu64(property?: string): Layout<number>;
  export function u16be(property?: string): Layout<number>;
  export function u24be(property?: string): Layout<number>;
  export function u32be(property?: string): Layout<number>;
  export function u48be(property?: string): Layout<number>;
  export function nu64be(property?: string): Layout<number>;
  export function s8(property?: string): Layout<number>;
  export function s16(property?: string): Layout<number>;
  export function s32(property?: string): Layout<number>;
  export function ns64(property?: string): Layout<number>;
  export function s16be(property?: string): Layout<number>;
  export function s32be(property?: string): Layout<number>;
  export function ns64be(property?: string): Layout<number>;
  export function f64(property?: string): Layout<number>;
  export function f64be(property?: string): Layout<number>;
}
