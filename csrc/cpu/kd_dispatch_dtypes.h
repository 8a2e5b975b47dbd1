// Instantiates kd_rows for each (student, teacher) storage-type pair of the vector type V.
// Float64 pairs only exist for the double compute type (WithDouble).
#pragma once

template <class V, class TS>
static void dispatch_teacher(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  switch (a.teacher_dtype) {
    case DType::Float32: return kd_rows<V, TS, float>(a, begin, end, scratch);
    case DType::BFloat16: return kd_rows<V, TS, bf16_t>(a, begin, end, scratch);
    case DType::Float16: return kd_rows<V, TS, f16_t>(a, begin, end, scratch);
    case DType::Float64:
      if constexpr (std::is_same_v<typename V::scalar, double>) return kd_rows<V, TS, double>(a, begin, end, scratch);
      return;
  }
}

template <class V, bool WithDouble>
static void dispatch_dtypes(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  switch (a.student_dtype) {
    case DType::Float32: return dispatch_teacher<V, float>(a, begin, end, scratch);
    case DType::BFloat16: return dispatch_teacher<V, bf16_t>(a, begin, end, scratch);
    case DType::Float16: return dispatch_teacher<V, f16_t>(a, begin, end, scratch);
    case DType::Float64:
      if constexpr (WithDouble) return dispatch_teacher<V, double>(a, begin, end, scratch);
      return;
  }
}
