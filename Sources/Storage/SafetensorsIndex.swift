import Foundation
import TensorCore

/// A sharded checkpoint: `model.safetensors.index.json` (`weight_map`: tensor name → shard file in
/// the same folder) and its shards, each validated as a `SafetensorsFile`.
public final class ShardedSafetensors: TensorSource, @unchecked Sendable {
    public let indexPath: String
    /// The index's `metadata` object (for example `total_size`), empty when absent.
    public let metadata: [String: JSONValue]
    /// Tensor name → shard file name.
    public let weightMap: [String: String]
    /// Shard file name → opened shard.
    public let shards: [String: SafetensorsFile]

    public init(indexURL: URL, mode: SafetensorsFile.LoadMode = .memoryMap) throws {
        let path = indexURL.path
        indexPath = path
        let data: Data
        do {
            data = try FileUtil.read(path, limit: SafetensorsFile.maxHeaderBytes)
        } catch {
            throw SafetensorsError.io(file: path, message: "\(error)")
        }
        let root: JSONValue
        do {
            root = try JSONValue(parsing: data)
        } catch {
            throw SafetensorsError.invalidIndex(file: path, message: "not valid JSON")
        }
        guard case .object(let object) = root else {
            throw SafetensorsError.invalidIndex(file: path, message: "not a JSON object")
        }
        if let m = object["metadata"], m != .null {
            guard case .object(let map) = m else {
                throw SafetensorsError.invalidIndex(file: path, message: "'metadata' is not an object")
            }
            metadata = map
        } else {
            metadata = [:]
        }
        guard case .object(let map)? = object["weight_map"] else {
            throw SafetensorsError.invalidIndex(file: path, message: "'weight_map' is missing or not an object")
        }
        var weightMap: [String: String] = [:]
        for (name, value) in map {
            guard case .string(let shard) = value else {
                throw SafetensorsError.invalidIndex(file: path, message: "weight_map['\(name)'] is not a string")
            }
            guard !shard.isEmpty, shard != ".", shard != "..", !shard.contains("/"), !shard.contains("\0") else {
                throw SafetensorsError.invalidIndex(file: path, message: "weight_map['\(name)'] names '\(shard)', not a file in the index's folder")
            }
            weightMap[name] = shard
        }
        self.weightMap = weightMap
        let folder = indexURL.deletingLastPathComponent()
        var shards: [String: SafetensorsFile] = [:]
        for shard in Set(weightMap.values).sorted() {
            shards[shard] = try SafetensorsFile(contentsOf: folder.appendingPathComponent(shard), mode: mode)
        }
        for (name, shard) in weightMap.sorted(by: { $0.key < $1.key }) where !shards[shard]!.contains(name) {
            throw SafetensorsError.invalidIndex(file: path, message: "tensor '\(name)' is mapped to \(shard), which does not hold it")
        }
        self.shards = shards
    }

    public var tensorNames: [String] { weightMap.keys.sorted() }

    /// The opened shard holding `name`.
    public func shard(for name: String) throws -> SafetensorsFile {
        guard let shard = weightMap[name], let file = shards[shard] else {
            throw SafetensorsError.tensorNotFound(file: indexPath, tensor: name)
        }
        return file
    }

    public func info(_ name: String) throws -> SafetensorsTensorInfo { try shard(for: name).info(name) }
    public func tensor(_ name: String) throws -> Tensor { try shard(for: name).tensor(name) }
    public func integers(_ name: String) throws -> [Int] { try shard(for: name).integers(name) }
}

/// Opens the weights of a Hugging Face model folder.
public enum SafetensorsModel {
    public static let singleFileName = "model.safetensors"
    public static let indexFileName = "model.safetensors.index.json"

    /// `model.safetensors` if present, otherwise `model.safetensors.index.json` and its shards.
    public static func open(directory: URL, mode: SafetensorsFile.LoadMode = .memoryMap) throws -> any TensorSource {
        let single = directory.appendingPathComponent(singleFileName)
        if FileUtil.exists(single.path) { return try SafetensorsFile(contentsOf: single, mode: mode) }
        let index = directory.appendingPathComponent(indexFileName)
        if FileUtil.exists(index.path) { return try ShardedSafetensors(indexURL: index, mode: mode) }
        throw SafetensorsError.io(file: directory.path, message: "neither \(singleFileName) nor \(indexFileName) found")
    }
}

extension ShardedSafetensors {
    /// Writes `tensors` as shards of at most `maxShardBytes` of data each (a larger tensor gets a shard
    /// of its own) and `<stem>.safetensors.index.json` naming them, with `metadata` in the index.
    /// The shards get names of their own (`<stem>-<tag>-<k>-of-<n>.safetensors`), the index is renamed
    /// into place last, and only then are the shards of an earlier index removed: a crash at any moment
    /// leaves the earlier or the new set whole. Returns the index's URL.
    @discardableResult
    public static func write(_ tensors: [(String, Tensor)], metadata: [String: String], to folder: URL, stem: String,
                             tag: String, maxShardBytes: Int) throws -> URL {
        var groups: [[(String, Tensor)]] = [[]]
        var bytes = 0
        for item in tensors {
            let b = item.1.count * 4
            if bytes > 0 && bytes + b > maxShardBytes { groups.append([]); bytes = 0 }
            groups[groups.count - 1].append(item)
            bytes += b
        }
        let n = groups.count
        var weightMap: [String: JSONValue] = [:]
        var names: Set<String> = []
        for (k, group) in groups.enumerated() {
            let name = "\(stem)-\(tag)-" + String(format: "%05d-of-%05d", k + 1, n) + ".safetensors"
            var w = SafetensorsWriter()
            for (t, value) in group { try w.add(t, value); weightMap[t] = .string(name) }
            try w.write(to: folder.appendingPathComponent(name))
            names.insert(name)
        }
        let index: JSONValue = .object(["metadata": .object(metadata.mapValues { .string($0) }), "weight_map": .object(weightMap)])
        let url = folder.appendingPathComponent(stem + ".safetensors.index.json")
        let data = Data((index.description + "\n").utf8)
        do {
            try AtomicFile.write(to: url.path) { fd in try data.withUnsafeBytes { try POSIXFileSystem.writeAll(fd: fd, $0, path: url.path) } }
            for old in try FileUtil.list(folder.path) where old.hasPrefix(stem + "-") && old.hasSuffix(".safetensors") && !names.contains(old) {
                try POSIXFileSystem().removeFile(atPath: folder.appendingPathComponent(old).path)
            }
        } catch let error as FileIOError {
            throw SafetensorsError.io(file: url.path, message: error.description)
        }
        return url
    }
}
